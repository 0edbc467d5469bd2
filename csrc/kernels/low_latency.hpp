#pragma once
// Argument structs, workspace layout and host launchers of the low-latency (LL) path: every token goes
// straight from its rank to the rank of each expert it chose (one put per (token, expert)), through
// the Transport (transport.cuh), into fixed per-(expert, source) slots. Each op is two kernels:
//
//   low_latency_dispatch_send  -> (other work) -> low_latency_dispatch_recv   -> experts ->
//   low_latency_combine_send   -> (other work) -> low_latency_combine_recv
//
// Send kernels only write into peers' buffers (put_signal / signal_add) and never wait; receive
// kernels only read this rank's own buffer and signals, and wait only on signals other ranks' send
// kernels add. So no block ever waits on another block of its own grid, and no host exchange is needed.
//
// Sizes: R = num_ranks, L = num_local_experts (E_loc), E = R * L, rank r hosts experts [rL, (r+1)L),
// M = num_max_tokens (num_max_dispatch_tokens_per_rank), H = hidden, N = num_tokens (<= M), K = num_topk.
//
// Completion by counting, without cross-warp ordering. Each call adds exactly one "unit" to each of
// its signals, however its puts are split among warps:
//   dispatch signal (slot, j, s) on rank d (d hosts expert e = dL + j): source s adds 1 per row put
//     (put_signal) and, with the count message (a put of count(e, s) into counts[slot][j][s]),
//     M + 1 - count. Unit = M + 1. The receiver waits for >= generation * (M + 1).
//   combine signal (slot, e) on source s: owner of e adds 1 per row put back and, after them,
//     M + 1 - count(e, s) (signal_add). Unit = M + 1. The reducer waits for >= generation * (M + 1).
// Every add is a strong transport signal for its own bytes, and the adds of one call sum to the unit
// only once all of them landed, so a reader that sees the total sees every row and the count, no matter
// which warp put what. (No "count after rows" ordering is assumed; see "GPU-only assumptions".)
//
// Order-strict results: within local expert j, source s's rows fill [begin(j, s), begin + count),
// begin = sum of count(j, s') over s' < s; inside a slice, row p is the p-th token of s (ascending
// token index) routed to expert j: p = slot_of[n, k] = #{n' < n on s routed to the same expert}.
//
// Double buffering: the region holds two identical slots. A call names its slot. The slot's generation
// is the number of LL dispatches (combines) on it since the last clean, counting this one, the same on
// every rank as calls are collective. It lives in the region, not in the kernels' parameters: each rank's
// generation words (this rank's own memory, never touched by peers), which the send kernel increments
// and the receive kernel of the same call, later in the same stream, reads. So a CUDA graph that captured
// a decode step counts its replays too (a generation passed as a parameter would be replayed as it was
// captured, and a receive would see the previous call's signals as complete). Signals only grow; `clean`
// (the host zeroes [region_offset, region_offset + counters_end()) -- or the whole region -- on every
// rank, between two barriers, and runs low_latency_reset_signals in between for transports whose signals
// live outside the region: GIN) restarts generations at 0. After any failure (ErrorSlot set; the abort
// signal is raised on every rank) clean before the next LL call.
//
// Reuse: slot x of call g + 2 overwrites what call g left there. That is safe when every rank runs its
// calls in stream order, each combine-recv of g before the dispatch-send of g + 2 and each
// dispatch-recv of g before the dispatch-send of g + 2 (at most two calls in flight, as DeepEP's two
// LL buffers): a rank's send of g + 2 then follows, through the signals it waited on in between,
// every peer's receive of g.
//
// Errors: waits time out after timeout_cycles (ErrorSlot: kernel, role, channel = the expert waited
// for, peer = the rank waited on); the failing warp then adds 1 to the abort signal of every rank
// (itself included), which ends every other LL wait with kPeerAborted. Send kernels report kBadInput
// (an expert id out of range or repeated in a row; a layout_range slice out of bounds) the same way.
//
// GPU-only assumptions (the CPU target cannot show them):
//   - put_signal is strong for its own bytes: a reader that acquires the signal (read_signal) sees
//     the bytes of every put whose add it observes, and adds from different warps of one rank to the
//     same signal all count (ShmTransport: each lane 0 does a release fetch-add after __syncwarp; the
//     reader's acquire load synchronises with every release RMW in the signal's modification order).
//     GIN: needs ncclGin_SignalAdd with a strong signal per put (visibility of the add implies the
//     put's data is settled at the destination), from any warp/context, to the same signal id; no
//     ordering between different warps' puts is needed. A weak/relaxed signal would need a fence plus
//     a separate strong signal per (expert, source), which this design avoids.
//   - Signal adds do not overflow: a signal grows by M + 1 per call on its slot (2^64 / (M + 1) calls).
//   - No block waits on another block of its grid; the grids may be any size (not all blocks need
//     be resident). A receive kernel needs the peers' send kernels to run eventually (other streams,
//     other GPUs); a send kernel needs nothing.
//   - x, recv_x, recv_x_scales rows and the buffer are 16-byte aligned (validate checks the pointers):
//     the kernels move 16-byte vectors.
//   - FP8 (as epcomm/fp8.py): scale = max(amax, 1e-4) / 448, rounded up to a power of two with
//     round_scale; e4m3 = round-to-nearest-even of x / scale, saturating at 448. Blocks holding inf or
//     NaN come back NaN (the NaN's sign bit may differ between targets). The divisions are IEEE
//     (nvcc's default -prec-div=true); combine's w * row and the sum use __fmul_rn / __fadd_rn (no fma
//     contraction), so both targets agree bit for bit.
//   - Signal ids: the LL kernels use the transport's signals 0 .. 4E (layout.num_signals()). A binding
//     that also serves the internode path gives LL its own signal range (ShmTransport: signals_offset_ =
//     layout.signals_buffer_offset(); GIN: the top 4E + 1 signals of the session, an id base the binding
//     adds, runtime/gin_low_latency_entries.cu). Signals outlive a zeroing of the region on GIN:
//     low_latency_reset_signals zeroes them through the transport (clean_low_latency_buffer runs it).
//   - clock64 (the wait-cost statistic and timeouts): SM cycles on a GPU, nanoseconds on the CPU target.

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "../common/fields.hpp"
#include "../transport/shm_transport.cuh"
#include "../transport/transport.cuh"
#include "error.cuh"
#include "intranode.hpp"
#include "workspace.cuh"

namespace epcomm::kernels {

using transport::WarpCoop;  // who takes part in a transport call (transport/transport.cuh)

// Limits of the LL kernels, with the reason for each.
inline constexpr int kMaxLowLatencyTopk = 16;          // row senders check K ids pairwise; reducers wait a lane per k
inline constexpr int kLowLatencyWarps = 16;            // warps per block (512 threads: 128 registers per thread)
inline constexpr int kLowLatencyThreads = 32 * kLowLatencyWarps;
inline constexpr int kLowLatencyMaxBlocks = 128;       // work items are strided over the grid's warps
inline constexpr int kLowLatencyScaleBlock = 128;      // FP8: one scale per 1 x 128 block of a row
inline constexpr int kLowLatencyUe8m0Group = 4;        // UE8M0: four block exponents per int32 word
inline constexpr int kLowLatencyReduceElements = 256;  // combine recv: elements per work item (32 lanes x 8)
inline constexpr float kLowLatencyAmaxEps = 1e-4f;     // FP8: a block's amax is clamped to >= this (epcomm/fp8.py)

// Where everything lives in each rank's LL region (the same on every rank, so an offset names the same
// place in a peer's buffer). Offsets returned by the accessors are absolute (region_offset included);
// the *_offset fields are relative to the region.
//
//   region (relative)  type / shape                                  written by                  read by
//   signals            uint64 [4E + 1]                               the transport (remote adds) this rank
//     dispatch         [2 (slot)][L (local expert)][R (source)]      source: +1 per row, count   slice receiver
//     combine          [2 (slot)][E (global expert)]                 owner: +1 per row, rest     reducer
//     abort            [1]                                           any failing rank: +1        every LL wait
//   generations        uint64 [2 (slot)][2 (dispatch, combine)]      this rank's send kernels    its receive kernels
//   slot x (2 copies, slot_bytes each, from slots_offset):
//     count_staging    int32 [E]                    this rank: count of its tokens per expert, then put
//     counts           int32 [L][R]                 put by source s: rows of s for local expert j
//     dispatch_staging [M] x message                this rank: each token quantized once, then put K times
//     dispatch_recv    [L][R][M] x message          put by source s: its p-th row for local expert j
//     combine_send     bf16 [L][R * M][H]           combine's x (the zero-copy buffer), or staged from x
//     combine_recv     bf16 [E][M][H]               put by the owner of e: row p of this rank's slice of e
//   message: [src_idx int32, 3 pad int32][data: 2H (bf16) or H (e4m3)][scales: H/128 f32 or H/512 int32],
//            stride sized for bf16 (the largest), 16-aligned; only the used bytes travel.
// Every region starts 128-aligned; total_bytes covers the signals and both slots.
struct LowLatencyLayout {
  int num_max_tokens = 0, hidden = 0, num_ranks = 0, num_local_experts = 0;
  size_t region_offset = 0;
  size_t message_bytes = 0;  // stride of a dispatch message
  size_t signals_offset = 0, generations_offset = 0, slots_offset = 0, slot_bytes = 0, total_bytes = 0;
  size_t count_staging_offset = 0, counts_offset = 0, dispatch_staging_offset = 0, dispatch_recv_offset = 0,
         combine_send_offset = 0, combine_recv_offset = 0;  // within a slot

  LowLatencyLayout() = default;
  EPCOMM_HOST_DEVICE LowLatencyLayout(int num_max_tokens_, int hidden_, int num_ranks_, int num_local_experts_,
                                      size_t region_offset_ = 0)
      : num_max_tokens(num_max_tokens_),
        hidden(hidden_),
        num_ranks(num_ranks_),
        num_local_experts(num_local_experts_),
        region_offset(region_offset_) {
    size_t const M = size_t(num_max_tokens), H = size_t(hidden), R = size_t(num_ranks), L = size_t(num_local_experts);
    size_t const E = R * L;
    message_bytes = align_up(kMessageHeaderBytes + 2 * H, 16);
    size_t offset = 0;
    auto const region = [&](size_t bytes) {
      size_t const start = offset;
      offset = align_up(offset + bytes, kRegionAlignment);
      return start;
    };
    signals_offset = region(sizeof(uint64_t) * size_t(num_signals()));
    generations_offset = region(sizeof(uint64_t) * kGenerationWords);
    slots_offset = offset;
    offset = 0;
    count_staging_offset = region(sizeof(int32_t) * E);
    counts_offset = region(sizeof(int32_t) * L * R);
    dispatch_staging_offset = region(M * message_bytes);
    dispatch_recv_offset = region(L * R * M * message_bytes);
    combine_send_offset = region(L * R * M * H * 2);
    combine_recv_offset = region(E * M * H * 2);
    slot_bytes = offset;
    total_bytes = slots_offset + 2 * slot_bytes;
  }

  static constexpr size_t kMessageHeaderBytes = 16;
  static constexpr size_t kGenerationWords = 4;  // [slot][dispatch, combine]

  // Bytes of the LL region in every rank's buffer (both slots).
  EPCOMM_HOST_DEVICE size_t required_bytes() const { return total_bytes; }
  // Bytes [0, counters_end()) of the region hold the signals and generations: zeroing them is a full clean.
  EPCOMM_HOST_DEVICE size_t counters_end() const { return slots_offset; }
  EPCOMM_HOST_DEVICE int num_experts() const { return num_ranks * num_local_experts; }
  EPCOMM_HOST_DEVICE int64_t rows_per_expert() const { return int64_t(num_ranks) * num_max_tokens; }

  // Signal indices.
  EPCOMM_HOST_DEVICE int num_signals() const { return 4 * num_experts() + 1; }
  EPCOMM_HOST_DEVICE int dispatch_signal(int slot, int local_expert, int source) const {
    return (slot * num_local_experts + local_expert) * num_ranks + source;
  }
  EPCOMM_HOST_DEVICE int combine_signal(int slot, int expert) const {
    return 2 * num_experts() + slot * num_experts() + expert;
  }
  EPCOMM_HOST_DEVICE int abort_signal() const { return 4 * num_experts(); }
  // Where the transport's signals start in each rank's buffer (ShmTransport::signals_offset_).
  EPCOMM_HOST_DEVICE size_t signals_buffer_offset() const { return region_offset + signals_offset; }
  // What each call adds to each of its signals.
  EPCOMM_HOST_DEVICE uint64_t signal_unit() const { return uint64_t(num_max_tokens) + 1; }
  // Absolute offset of the uint64 generation of `slot`'s dispatches (or combines) in this rank's buffer.
  EPCOMM_HOST_DEVICE size_t generation(int slot, bool combine) const {
    return region_offset + generations_offset + sizeof(uint64_t) * size_t(2 * slot + (combine ? 1 : 0));
  }

  // Absolute offsets in the RDMA buffer.
  EPCOMM_HOST_DEVICE size_t slot_base(int slot) const { return region_offset + slots_offset + size_t(slot) * slot_bytes; }
  EPCOMM_HOST_DEVICE size_t count_staging(int slot, int expert) const {
    return slot_base(slot) + count_staging_offset + sizeof(int32_t) * size_t(expert);
  }
  EPCOMM_HOST_DEVICE size_t count(int slot, int local_expert, int source) const {
    return slot_base(slot) + counts_offset + sizeof(int32_t) * (size_t(local_expert) * num_ranks + source);
  }
  EPCOMM_HOST_DEVICE size_t dispatch_staging(int slot, int token) const {
    return slot_base(slot) + dispatch_staging_offset + size_t(token) * message_bytes;
  }
  EPCOMM_HOST_DEVICE size_t dispatch_recv(int slot, int local_expert, int source, int position) const {
    return slot_base(slot) + dispatch_recv_offset +
           ((size_t(local_expert) * num_ranks + source) * num_max_tokens + position) * message_bytes;
  }
  // The zero-copy buffer of `slot`: bf16 [L][R * M][H]; row (j, t) at combine_send_row(slot, j, t).
  EPCOMM_HOST_DEVICE size_t combine_send_buffer(int slot) const { return slot_base(slot) + combine_send_offset; }
  EPCOMM_HOST_DEVICE size_t combine_send_row(int slot, int local_expert, int64_t row) const {
    return combine_send_buffer(slot) + (size_t(local_expert) * rows_per_expert() + size_t(row)) * row_bytes();
  }
  EPCOMM_HOST_DEVICE size_t combine_recv(int slot, int expert, int position) const {
    return slot_base(slot) + combine_recv_offset + (size_t(expert) * num_max_tokens + position) * row_bytes();
  }
  EPCOMM_HOST_DEVICE size_t row_bytes() const { return size_t(hidden) * 2; }  // a bf16 row
};

// A message's used bytes and its parts, for one call's mode.
struct LowLatencyMessage {
  int data_bytes;   // 2H (bf16) or H (e4m3)
  int scale_words;  // 0, H/128 (f32) or H/512 (UE8M0 int32)
  EPCOMM_HOST_DEVICE int used_bytes() const {
    return int(LowLatencyLayout::kMessageHeaderBytes) + data_bytes + 4 * scale_words;
  }
};
EPCOMM_HOST_DEVICE LowLatencyMessage low_latency_message(int hidden, bool use_fp8, bool use_ue8m0) {
  if (!use_fp8) return {2 * hidden, 0};
  return {hidden, use_ue8m0 ? hidden / (kLowLatencyScaleBlock * kLowLatencyUe8m0Group) : hidden / kLowLatencyScaleBlock};
}

// What Python passes to run an LL kernel besides its Params: the workspace shape (the same on every
// rank for a call; R comes from the runtime) and where the LL region starts in each rank's buffer.
#define EPCOMM_LOW_LATENCY_SPEC_FIELDS(F)                                                                 \
  F(int, num_max_tokens, 0, "M = num_max_dispatch_tokens_per_rank: the most tokens a rank dispatches") \
  F(int, hidden, 0, "H: elements per row (a multiple of 8; of 128 with FP8, of 512 with UE8M0)")      \
  F(int, num_local_experts, 0, "L: experts per rank")                                                  \
  F(int64_t, region_offset, 0, "byte offset of the LL region in each rank's RDMA buffer (128-aligned)") \
  F(int, num_nvl_ranks, 1, "ranks per node: only classifies the bytes the transport counts (self, nvlink, network)")
struct LowLatencySpec {
  EPCOMM_LOW_LATENCY_SPEC_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(LowLatencySpec const&) const = default;
};

inline LowLatencyLayout low_latency_layout(LowLatencySpec const& spec, int num_ranks) {
  return LowLatencyLayout(spec.num_max_tokens, spec.hidden, num_ranks, spec.num_local_experts,
                          size_t(spec.region_offset));
}

// The runtime's part of every LL kernel's Args.
template <class Transport>
struct LowLatencyComm {
  static_assert(transport::DeviceTransport<Transport>,
                "Transport must model the concept of transport/transport.cuh (rank, num_ranks, local_buffer, "
                "put_signal, signal_add, read_signal, flush; trivially copyable)");
  int rank = 0, num_ranks = 1;
  LowLatencyLayout layout;  // the same on every rank; its signals at layout.signals_buffer_offset()
  Transport transport;      // its signal i is the layout's signal i
  ErrorSlot* error = nullptr;
  long long timeout_cycles = kDefaultTimeoutCycles;
};

// low_latency_dispatch_send: quantizes (or copies) each token once into staging, puts it to every
// expert it chose, and sends every (expert, this rank) pair its count. Writes slot_of.
#define EPCOMM_LL_DISPATCH_SEND_FIELDS(F)                                                                       \
  F(int, slot, 0, "0 or 1: the LL buffer slot of this call")                                                  \
  F(void const*, x, nullptr, "[N, H] bf16, rows 16-byte aligned")                                              \
  F(int, num_tokens, 0, "N, 0 <= N <= num_max_tokens")                                                         \
  F(int64_t const*, topk_idx, nullptr, "[N, K] global expert ids; -1 = none; no id twice in a row")            \
  F(int, num_topk, 0, "K, 1 <= K <= 16")                                                                       \
  F(bool, use_fp8, false, "send e4m3 data + per-128 scales instead of bf16")                                   \
  F(bool, round_scale, false, "FP8: scales are the smallest power of two >= max(amax, 1e-4) / 448")             \
  F(bool, use_ue8m0, false, "FP8: scales travel and land as UE8M0 bytes (needs round_scale, H % 512 == 0)")   \
  F(int32_t*, slot_of, nullptr, "[N, K] out: position of token n in its slice of expert topk_idx[n, k]; -1 for none") \
  F(uint64_t*, byte_counters, nullptr, "[3] in/out or null: bytes put per link class (self, nvlink, network)")
struct LowLatencyDispatchSendParams {
  using Spec = LowLatencySpec;
  static constexpr char const* kName = "low_latency_dispatch_send";
  EPCOMM_LL_DISPATCH_SEND_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct LowLatencyDispatchSendArgs : WithComm<LowLatencyComm<Transport>>, LowLatencyDispatchSendParams {
  using Params = LowLatencyDispatchSendParams;
};

// low_latency_dispatch_recv: waits for every source's slices of this rank's experts and places them.
#define EPCOMM_LL_DISPATCH_RECV_FIELDS(F)                                                                        \
  F(int, slot, 0, "the dispatch's slot")                                                                        \
  F(bool, use_fp8, false, "as the send kernel")                                                                \
  F(bool, use_ue8m0, false, "as the send kernel")                                                              \
  F(void*, recv_x, nullptr, "[L, R*M, H] out: bf16, or e4m3 with use_fp8")                                     \
  F(void*, recv_x_scales, nullptr, "FP8 out: f32 [L, H/128, R*M] or, with UE8M0, int32 [L, H/512, R*M] (token fastest)") \
  F(int32_t*, recv_count, nullptr, "[L] out: rows received per local expert")                                  \
  F(int32_t*, src_info, nullptr, "[L, R*M] out: each row's token index on its source rank")                     \
  F(int64_t*, layout_range, nullptr, "[L, R] out: begin << 32 | count of source s's slice of expert j")         \
  F(int32_t*, cumulative_local_expert_recv_stats, nullptr, "[L] in/out or null: += rows received")           \
  F(int64_t*, dispatch_wait_recv_cost_stats, nullptr, "[R] in/out or null: += clock64 ticks waited per source")
struct LowLatencyDispatchRecvParams {
  using Spec = LowLatencySpec;
  static constexpr char const* kName = "low_latency_dispatch_recv";
  EPCOMM_LL_DISPATCH_RECV_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct LowLatencyDispatchRecvArgs : WithComm<LowLatencyComm<Transport>>, LowLatencyDispatchRecvParams {
  using Params = LowLatencyDispatchRecvParams;
};

// low_latency_combine_send: puts every received row back to its source (rows of x, or of the zero-copy
// buffer when x is it), then completes each (expert, source) signal.
#define EPCOMM_LL_COMBINE_SEND_FIELDS(F)                                                                          \
  F(int, slot, 0, "the dispatch's slot")                                                                         \
  F(void const*, x, nullptr, "[L, R*M, H] bf16 expert outputs (may be the slot's zero-copy buffer); rows past recv_count unread") \
  F(int64_t const*, layout_range, nullptr, "[L, R] from the dispatch")                                          \
  F(uint64_t*, byte_counters, nullptr, "[3] in/out or null: bytes put per link class (self, nvlink, network)")
struct LowLatencyCombineSendParams {
  using Spec = LowLatencySpec;
  static constexpr char const* kName = "low_latency_combine_send";
  EPCOMM_LL_COMBINE_SEND_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct LowLatencyCombineSendArgs : WithComm<LowLatencyComm<Transport>>, LowLatencyCombineSendParams {
  using Params = LowLatencyCombineSendParams;
};

// low_latency_combine_recv: out[n] = bf16(sum over k ascending, topk_idx[n, k] != -1, of
// w[n, k] * float(row)), in fp32 from 0.0f, rounded once.
#define EPCOMM_LL_COMBINE_RECV_FIELDS(F)                                                                        \
  F(int, slot, 0, "the dispatch's slot")                                                                       \
  F(int, num_tokens, 0, "N of the dispatch")                                                                   \
  F(int64_t const*, topk_idx, nullptr, "[N, K] of the dispatch")                                               \
  F(float const*, topk_weights, nullptr, "[N, K]")                                                             \
  F(int, num_topk, 0, "K of the dispatch")                                                                     \
  F(int32_t const*, slot_of, nullptr, "[N, K] from the dispatch send")                                         \
  F(void*, out, nullptr, "[N, H] bf16 out, rows 16-byte aligned")
struct LowLatencyCombineRecvParams {
  using Spec = LowLatencySpec;
  static constexpr char const* kName = "low_latency_combine_recv";
  EPCOMM_LL_COMBINE_RECV_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct LowLatencyCombineRecvArgs : WithComm<LowLatencyComm<Transport>>, LowLatencyCombineRecvParams {
  using Params = LowLatencyCombineRecvParams;
};

// low_latency_reset_signals: zeroes this rank's 4E + 1 LL transport signals (a clean, or a change of LL
// layout). Zeroing the region is not enough on every transport: GIN keeps its signals in the session,
// outside the window. Before zeroing a signal it waits for the adds still due to it (a network add may land
// after the kernel that issued it ended, and a receive kernel waits only for what it reads: the combine
// signals of experts none of this rank's tokens chose, or a dispatch whose hook never ran): every call
// adds one unit (M + 1) to each signal of its slot, so signal (slot x) reaches calls-on-x * (M + 1). It
// waits for nothing once the abort signal is set (a failed call: its adds are unknown). The caller makes
// sure no new add comes meanwhile: every rank has finished its LL calls before, and meets every other rank
// after, as clean_low_latency_buffer does (ncclGin::resetSignal "may not race with concurrent
// modifications").
#define EPCOMM_LL_RESET_SIGNALS_FIELDS(F)                                                                 \
  F(bool, wait_for_due, true, "wait for the adds due by the region's generations; false: zero at once (the region was overwritten)")
struct LowLatencyResetSignalsParams {
  using Spec = LowLatencySpec;
  static constexpr char const* kName = "low_latency_reset_signals";
  EPCOMM_LL_RESET_SIGNALS_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct LowLatencyResetSignalsArgs : WithComm<LowLatencyComm<Transport>>, LowLatencyResetSignalsParams {
  using Params = LowLatencyResetSignalsParams;
};
inline constexpr int kLowLatencyResetBlocks = 1;  // a few thousand stores at most: one block strides over them

// Grid sizes (the same on both targets): one warp per work item, strided when capped.
EPCOMM_HOST_DEVICE int low_latency_blocks_for(int64_t work_items) {
  int64_t const blocks = (work_items + kLowLatencyWarps - 1) / kLowLatencyWarps;
  return blocks < 1 ? 1 : blocks > kLowLatencyMaxBlocks ? kLowLatencyMaxBlocks : int(blocks);
}
// dispatch send: tokens (quantize + put) and experts (count messages)
inline int low_latency_dispatch_send_blocks(int num_tokens, int num_experts) {
  return low_latency_blocks_for(num_tokens > num_experts ? num_tokens : num_experts);
}
// dispatch recv and combine send: (local expert, source rank) pairs
inline int low_latency_pair_blocks(int num_experts) { return low_latency_blocks_for(num_experts); }
// combine recv: (token, 256-element chunk) items
EPCOMM_HOST_DEVICE int low_latency_reduce_chunks(int hidden) {
  return (hidden + kLowLatencyReduceElements - 1) / kLowLatencyReduceElements;
}
inline int low_latency_combine_recv_blocks(int num_tokens, int hidden) {
  return low_latency_blocks_for(int64_t(num_tokens) * low_latency_reduce_chunks(hidden));
}

using ShmLowLatencyComm = LowLatencyComm<transport::ShmTransport>;

// Host-side validation: low_latency_validate.hpp. CUDA target (low_latency_launch.cu): enqueue on
// `stream`, return a cudaError_t (cudaErrorInvalidValue for arguments validate refuses).
int cuda_launch_low_latency_dispatch_send(LowLatencyDispatchSendArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_low_latency_dispatch_recv(LowLatencyDispatchRecvArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_low_latency_combine_send(LowLatencyCombineSendArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_low_latency_combine_recv(LowLatencyCombineRecvArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_low_latency_reset_signals(LowLatencyResetSignalsArgs<transport::ShmTransport> const& args, void* stream);

}  // namespace epcomm::kernels

#if EPCOMM_TARGET_SIMT
namespace epcomm::kernels {

// CPU target (low_latency_launch_simt.cpp): add one rank's grid to a ConcurrentLaunch (all ranks in one
// process). Invalid arguments throw std::invalid_argument.
void add_low_latency_dispatch_send(simt::ConcurrentLaunch& launch,
                                   LowLatencyDispatchSendArgs<transport::ShmTransport> const& args);
void add_low_latency_dispatch_recv(simt::ConcurrentLaunch& launch,
                                   LowLatencyDispatchRecvArgs<transport::ShmTransport> const& args);
void add_low_latency_combine_send(simt::ConcurrentLaunch& launch,
                                  LowLatencyCombineSendArgs<transport::ShmTransport> const& args);
void add_low_latency_combine_recv(simt::ConcurrentLaunch& launch,
                                  LowLatencyCombineRecvArgs<transport::ShmTransport> const& args);
void add_low_latency_reset_signals(simt::ConcurrentLaunch& launch,
                                   LowLatencyResetSignalsArgs<transport::ShmTransport> const& args);

}  // namespace epcomm::kernels
#endif
