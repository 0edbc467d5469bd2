#pragma once
// How a kernel fails: instead of printf + trap, the first failing thread of a
// rank fills that rank's ErrorSlot (host-readable memory), raises the abort
// flag in every peer's NVL buffer so their spin-waits stop early, and the
// kernel returns. The host reads the slot after the launch completes.

#include <cstddef>
#include <cstdint>
#include <cstdio>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"

namespace epcomm::kernels {

enum class ErrorCode : int32_t {
  kNone = 0,
  kTimeout = 1,      // this thread waited longer than timeout_cycles
  kPeerAborted = 2,  // another rank (or thread) failed first and raised the abort flag
  kBadRouting = 3,   // a token needs more nodes than the buffers were sized for (expected = limit, observed = nodes)
  kBadInput = 4,     // low-latency: an expert id out of range or repeated in a row (expected = num_experts,
                     // observed = the id), or a layout_range slice out of bounds (expected = bound, observed = end)
  kCallRejected = 5,  // a data kernel's call check (call_check.cuh) said not every rank runs this call: nothing
                      // moved (peer = the first rank whose call header differed, expected = 0, observed = its
                      // flags + 256 when its call differs, or -1). Raises no abort: every rank stops alike.
  kRecvOverflow = 6,  // a dispatch counted on the device received more rows than its outputs hold
                      // (num_worst_tokens): expected = rows held, observed = rows received; none past the
                      // outputs were written. Raises the abort flag: no host saw the count, so the other
                      // ranks learn it only so (their kernels stop, now or at their next wait).
};

enum class KernelId : int32_t {
  kNone = 0,
  kNotify = 1,
  kDispatch = 2,
  kCombine = 3,
  kInternodeNotify = 4,
  kInternodeDispatch = 5,
  kInternodeCombine = 6,
  kLowLatencyDispatchSend = 7,
  kLowLatencyDispatchRecv = 8,
  kLowLatencyCombineSend = 9,
  kLowLatencyCombineRecv = 10,
  kLowLatencyResetSignals = 11,
};

enum class Role : int32_t {
  kNone = 0,
  kNotifyBarrier = 1,     // waits for every peer's barrier signal
  kDispatchSender = 2,    // waits for free slots in a peer's ring (head)
  kDispatchReceiver = 3,  // waits for rows in its own ring (tail)
  kCombineSender = 4,
  kCombineReceiver = 5,
  // internode (peer = the rank waited on; channel = -1 when not applicable)
  kInternodeNotifyBarrier = 6,   // waits for every rank's barrier signal (counts arrive with it)
  kNetworkSender = 7,            // dispatch: waits for free network slots (head returned by the coordinator)
  kForwarder = 8,                // dispatch: waits for network rows, then for free slots in an NVL ring
  kForwarderCoordinator = 9,     // dispatch: waits for the forwarder warps' progress
  kNvlReceiver = 10,             // dispatch: waits for rows in its NVL ring from one forwarder
  kCombineNvlSender = 11,        // combine: waits for free slots in the forwarder's NVL ring
  kCombineForwarder = 12,        // combine: waits for NVL rows, then for free network slots
  kCombineNetworkReceiver = 13,  // combine: waits for partial rows from a forwarding node
  // low-latency (channel = the expert: local in dispatch, global in combine; peer = the rank waited on)
  kLlRowSender = 14,       // dispatch send: checks each token's expert ids (kBadInput), quantizes and puts rows
  kLlSliceReceiver = 15,   // dispatch receive: waits for (expert, source) slices of every source <= its own
  kLlCombineSender = 16,   // combine send: checks its layout_range slice (kBadInput), puts rows back
  kLlReducer = 17,         // combine receive: waits for the rows of every expert of its token
  kSignalReset = 18,       // internode re-layout: waits for the adds still due to one of its signals (channel and
                           // peer of a ring signal; peer = source of a barrier signal)
  kCallGate = 19,          // a data kernel's first check: the verdict of the notify's call check (kCallRejected)
};

inline constexpr int32_t kErrorSlotClaimed = -1;  // `code` while the first failing thread fills the slot

// One per rank and launch. Zero-initialised by the host; `code` != 0 after a failed launch.
struct ErrorSlot {
  int32_t code;  // ErrorCode
  int32_t rank;
  int32_t kernel;   // KernelId
  int32_t role;     // Role
  int32_t channel;  // -1 when not applicable
  int32_t peer;     // the rank waited on; -1 when not applicable
  int64_t expected;  // the counter value waited for
  int64_t observed;  // the last value read
};

inline char const* error_code_name(int32_t code) {
  switch (ErrorCode(code)) {
    case ErrorCode::kNone: return "none";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kPeerAborted: return "peer_aborted";
    case ErrorCode::kBadRouting: return "bad_routing";
    case ErrorCode::kBadInput: return "bad_input";
    case ErrorCode::kCallRejected: return "call_rejected";
    case ErrorCode::kRecvOverflow: return "recv_overflow";
  }
  return "unknown";
}

inline char const* kernel_name(int32_t kernel) {
  switch (KernelId(kernel)) {
    case KernelId::kNone: return "none";
    case KernelId::kNotify: return "notify";
    case KernelId::kDispatch: return "intranode_dispatch";
    case KernelId::kCombine: return "intranode_combine";
    case KernelId::kInternodeNotify: return "internode_notify";
    case KernelId::kInternodeDispatch: return "internode_dispatch";
    case KernelId::kInternodeCombine: return "internode_combine";
    case KernelId::kLowLatencyDispatchSend: return "low_latency_dispatch_send";
    case KernelId::kLowLatencyDispatchRecv: return "low_latency_dispatch_recv";
    case KernelId::kLowLatencyCombineSend: return "low_latency_combine_send";
    case KernelId::kLowLatencyCombineRecv: return "low_latency_combine_recv";
    case KernelId::kLowLatencyResetSignals: return "low_latency_reset_signals";
  }
  return "unknown";
}

inline char const* role_name(int32_t role) {
  switch (Role(role)) {
    case Role::kNone: return "none";
    case Role::kNotifyBarrier: return "notify_barrier";
    case Role::kDispatchSender: return "dispatch_sender";
    case Role::kDispatchReceiver: return "dispatch_receiver";
    case Role::kCombineSender: return "combine_sender";
    case Role::kCombineReceiver: return "combine_receiver";
    case Role::kInternodeNotifyBarrier: return "internode_notify_barrier";
    case Role::kNetworkSender: return "network_sender";
    case Role::kForwarder: return "forwarder";
    case Role::kForwarderCoordinator: return "forwarder_coordinator";
    case Role::kNvlReceiver: return "nvl_receiver";
    case Role::kCombineNvlSender: return "combine_nvl_sender";
    case Role::kCombineForwarder: return "combine_forwarder";
    case Role::kCombineNetworkReceiver: return "combine_network_receiver";
    case Role::kLlRowSender: return "ll_row_sender";
    case Role::kLlSliceReceiver: return "ll_slice_receiver";
    case Role::kLlCombineSender: return "ll_combine_sender";
    case Role::kLlReducer: return "ll_reducer";
    case Role::kSignalReset: return "signal_reset";
    case Role::kCallGate: return "call_gate";
  }
  return "unknown";
}

// One line for logs and exceptions, e.g. "intranode_dispatch timeout: rank=0 role=dispatch_sender channel=1
// peer=3 expected=12 observed=4". Host only. Returns `out`.
inline char const* describe_error(ErrorSlot const& slot, char* out, size_t size) {
  std::snprintf(out, size, "%s %s: rank=%d role=%s channel=%d peer=%d expected=%lld observed=%lld",
                kernel_name(slot.kernel), error_code_name(slot.code), slot.rank, role_name(slot.role), slot.channel,
                slot.peer, static_cast<long long>(slot.expected), static_cast<long long>(slot.observed));
  return out;
}

// Who is waiting, for the error report, and where to raise the alarm.
struct WaitContext {
  ErrorSlot* error;          // this rank's slot (may be null: failures then only abort)
  void* const* peer_buffers;  // [num_ranks] NVL buffer bases; each holds an abort flag
  size_t abort_flag_offset;   // NvlWorkspace::abort_flag_offset
  int num_ranks;
  int rank;
  KernelId kernel;
  Role role;
  int channel;
  int peer;
  long long timeout_cycles;  // clock64 units: SM cycles on a GPU, nanoseconds on the CPU target
  int own_index = -1;        // this rank's index in peer_buffers when that differs from `rank` (internode:
                             // the local rank; `rank` stays global for the report)
};

EPCOMM_DEVICE int32_t* abort_flag(WaitContext const& context, int rank) {
  return reinterpret_cast<int32_t*>(static_cast<char*>(context.peer_buffers[rank]) + context.abort_flag_offset);
}

// Fills the slot if no one did yet, then raises every rank's abort flag.
EPCOMM_DEVICE void report_failure(WaitContext const& context, ErrorCode code, int64_t expected, int64_t observed) {
  if (context.error != nullptr && atomicCAS(&context.error->code, 0, kErrorSlotClaimed) == 0) {
    ErrorSlot* slot = context.error;
    slot->rank = context.rank;
    slot->kernel = int32_t(context.kernel);
    slot->role = int32_t(context.role);
    slot->channel = context.channel;
    slot->peer = context.peer;
    slot->expected = expected;
    slot->observed = observed;
    ptx::st_release_sys_global(&slot->code, int32_t(code));
  }
  if (code != ErrorCode::kPeerAborted && code != ErrorCode::kCallRejected) {
    for (int r = 0; r < context.num_ranks; ++r) ptx::st_release_sys_global(abort_flag(context, r), int32_t(1));
  }
}

// Spins until load() >= expected. Returns false (after reporting) on timeout
// or when the abort flag of this rank is raised. `load` must poll through a
// ptx.cuh helper (acquire, so the caller may read the data it guards).
template <class Load>
EPCOMM_DEVICE bool wait_at_least(WaitContext const& context, int64_t expected, Load load, int64_t* observed_out) {
  long long const start = ptx::read_clock64();
  int32_t const* own_abort_flag = abort_flag(context, context.own_index >= 0 ? context.own_index : context.rank);
  for (int spins = 0;; ++spins) {
    int64_t const observed = int64_t(load());
    if (observed >= expected) {
      if (observed_out != nullptr) *observed_out = observed;
      return true;
    }
    if ((spins & 15) == 15) {
      if (ptx::ld_relaxed_sys_global(own_abort_flag) != 0) {
        report_failure(context, ErrorCode::kPeerAborted, expected, observed);
        return false;
      }
      if (ptx::read_clock64() - start > context.timeout_cycles) {
        report_failure(context, ErrorCode::kTimeout, expected, observed);
        return false;
      }
    }
  }
}

}  // namespace epcomm::kernels
