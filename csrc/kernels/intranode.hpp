#pragma once
// Argument structs and host launchers of the intranode (NVLink) path:
//   get_dispatch_layout -> notify_dispatch -> intranode_dispatch -> (experts) -> notify (barrier) -> intranode_combine
// All pointers are raw and must be readable/writable by the kernel (device
// memory on CUDA, including the `peer_buffers` array itself). Sizes: N =
// num_tokens (this rank), R = num_ranks, C = config.num_channels, K = num_topk,
// E = num_experts, L = E / R, M = rows received by this rank.
//
// Errors: a failing kernel fills `*error` (ErrorSlot, zeroed by the caller) and
// returns instead of trapping; the launch itself reports only launch problems.
// The CPU launchers return a simt::LaunchStatus; the CUDA launchers return
// the cudaError_t of the launch as an int. After any failure the NVL buffers
// hold a raised abort flag: re-create (re-zero) them before the next call.

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "../common/fields.hpp"
#include "config.cuh"
#include "elements.cuh"
#include "error.cuh"
#include "workspace.cuh"

namespace epcomm::kernels {

inline constexpr long long kDefaultTimeoutCycles = 100'000'000'000LL;  // ~50 s at 2 GHz; 100 s on the CPU target

// get_dispatch_layout: which ranks each token goes to, and the counts.
struct LayoutArgs {
  int64_t const* topk_idx = nullptr;     // [N, K]; -1 = no expert
  int num_tokens = 0, num_topk = 0, num_experts = 0, num_ranks = 1;
  int32_t* num_tokens_per_rank = nullptr;    // [R] out
  int32_t* num_tokens_per_expert = nullptr;  // [E] out
  bool* is_token_in_rank = nullptr;          // [N, R] out
};

// The parts every communicating kernel shares.
struct CommArgs {
  int rank = 0, num_ranks = 1;
  KernelConfig config;
  NvlWorkspace workspace;               // the same on every rank
  void* const* peer_buffers = nullptr;  // [R] NVL buffer base of each rank, valid in this process
  ErrorSlot* error = nullptr;           // this rank's error slot
  long long timeout_cycles = kDefaultTimeoutCycles;
};

// A kernel's Args = the runtime's part (comm: peer tables, error slot, timeout) + the Params Python sets.
// The comm part comes first (the first base): the kernels' parameter layout as before the split; with
// Params first, ptxas spilled 8 bytes in the internode dispatch kernel at its 64-register cap.
template <class Comm>
struct WithComm {
  Comm comm;
};

// What Python passes to run an intranode kernel besides its Params: the kernel config and the
// workspace shape every rank lays its NVL buffer out with (the same on every rank for a call).
#define EPCOMM_INTRANODE_SPEC_FIELDS(F)                                                   \
  F(KernelConfig, config, {}, "channels, chunk and ring sizes (from the call's Config)") \
  F(NvlWorkspaceShape, workspace, {}, "the NVL buffer's shape; workspace.num_ranks = R")
struct IntranodeSpec {
  EPCOMM_INTRANODE_SPEC_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(IntranodeSpec const&) const = default;
};

// notify: a barrier over peer memory (every rank's signal counter reaches the
// epoch, which each rank counts on the device: epoch.cuh), which also resets
// this rank's ring counters. With exchange_counts it also sends this rank's
// per-(peer, channel) and per-expert counts and builds the prefix matrices that
// place every received row. With a call check it also tells every rank whether
// all ranks run the same call (call_check.cuh).
// Both paths share these fields.
#define EPCOMM_NOTIFY_FIELDS(F)                                                                                      \
  F(bool, exchange_counts, false, "false: a barrier only (the fields below are unused)")                           \
  F(bool const*, is_token_in_rank, nullptr, "[N, R] in")                                                           \
  F(int32_t const*, num_tokens_per_expert, nullptr, "[E] in, or null: no per-expert counts")                       \
  F(int, num_tokens, 0, "N")                                                                                       \
  F(int, expert_alignment, 1, "per-expert receive counts are rounded up to this")                                 \
  F(int32_t*, recv_rank_prefix, nullptr, "[R + 1] out: rows from sources < s start at [s]; [R] = M")               \
  F(int32_t*, recv_channel_prefix_matrix, nullptr, "[R, C + 1] out: first row of (source s, channel c); [s][C] = end of s") \
  F(int32_t*, num_recv_tokens_per_expert, nullptr, "[L] out, each rounded up to expert_alignment (with num_tokens_per_expert)") \
  F(int64_t, call_digest, 0, "with call_flags >= 0: the hash of the call every rank should be running (call_check.cuh)") \
  F(int, call_flags, -1, "-1: no call check; else this rank's kCallRefused | kCallNeedsLayout bits")                 \
  F(int32_t*, call_agreed, nullptr, "[1] out with call_flags >= 0: 1 when every rank runs this call and accepts it") \
  F(int32_t*, call_mismatch, nullptr, "[2] out or null: the first rank whose header differed and its flags (call_check.cuh)")
struct NotifyParams {
  using Spec = IntranodeSpec;
  static constexpr char const* kName = "intranode_notify";
  EPCOMM_NOTIFY_FIELDS(EPCOMM_DECLARE_FIELD)
};
struct NotifyArgs : WithComm<CommArgs>, NotifyParams {
  using Params = NotifyParams;
};

// dispatch: rows of x (+ optional scale bytes) go to every rank that holds one of the token's
// experts; received rows are ordered by source rank, then source token. Both paths share these fields.
#define EPCOMM_DISPATCH_FIELDS(F)                                                                                  \
  F(void const*, x, nullptr, "[N, hidden_bytes] opaque row bytes (bf16 or e4m3)")                                 \
  F(int, hidden_bytes, 0, "bytes of an x row; a multiple of 4")                                                  \
  F(void const*, x_scales, nullptr, "[N, scale_bytes] opaque (FP8 scales); null when scale_bytes == 0")           \
  F(int, scale_bytes, 0, "bytes of a scales row; a multiple of 4")                                               \
  F(int64_t const*, topk_idx, nullptr, "[N, K] global expert ids, -1 = none; read when num_topk > 0")            \
  F(float const*, topk_weights, nullptr, "[N, K]; read when recv_topk_weights is set (on every rank)")           \
  F(int, num_topk, 0, "K; 0: no top-k metadata travels")                                                         \
  F(int, num_experts, 0, "E (with num_topk > 0): the uniform placement gives rank r experts [rL, (r+1)L)")     \
  F(int, num_tokens, 0, "N")                                                                                     \
  F(bool const*, is_token_in_rank, nullptr, "[N, R]")                                                            \
  F(int32_t const*, recv_channel_prefix_matrix, nullptr, "[R, C + 1] from notify")                               \
  F(void*, recv_x, nullptr, "[M, hidden_bytes] out")                                                             \
  F(void*, recv_x_scales, nullptr, "[M, scale_bytes] out")                                                       \
  F(int64_t*, recv_topk_idx, nullptr, "[M, K] out or null: local expert ids, -1 for experts of other ranks")    \
  F(float*, recv_topk_weights, nullptr, "[M, K] out or null: 0 where recv_topk_idx is -1")                      \
  F(int32_t*, recv_src_idx, nullptr, "[M] out: token index on the source rank")                                \
  F(int32_t const*, call_verdict, nullptr, "[3] or null: a notify's call_agreed + call_mismatch; not 1: do nothing")
// intranode_dispatch: the dispatch fields, plus the rows its outputs hold when the host did not read the
// notify's count (a dispatch counted on the device: num_worst_tokens under epcomm.host_sync_free or a
// graph capture). Rows beyond it are not written, and the kernel reports kRecvOverflow (with the abort
// flag: a failure of the call on every rank).
#define EPCOMM_INTRANODE_DISPATCH_FIELDS(F) \
  EPCOMM_DISPATCH_FIELDS(F)                 \
  F(int, recv_capacity, -1, "rows recv_x and the other outputs hold; -1: exactly the notify's count (read by the host)")
struct IntranodeDispatchParams {
  using Spec = IntranodeSpec;
  static constexpr char const* kName = "intranode_dispatch";
  EPCOMM_INTRANODE_DISPATCH_FIELDS(EPCOMM_DECLARE_FIELD)
};
struct IntranodeDispatchArgs : WithComm<CommArgs>, IntranodeDispatchParams {
  using Params = IntranodeDispatchParams;
};

// combine: the reverse path; out[t] = dtype(0 + (0 + row_d0 + row_d1 + ...)) in fp32 over the ranks d
// holding token t, ascending, rounded once to the rows' dtype. Weights (optional) are summed the same
// way. Both paths share these fields.
#define EPCOMM_COMBINE_FIELDS(F)                                                                                   \
  F(void const*, x, nullptr, "[M, hidden] of element_kind, rows in this rank's dispatch order")                  \
  F(ElementKind, element_kind, ElementKind::kBfloat16, "the rows' dtype: 1 bf16, 2 fp16, 3 fp32")               \
  F(float const*, topk_weights, nullptr, "[M, K]; travels when combined_topk_weights is set (on every rank)")    \
  F(int, hidden, 0, "elements per row")                                                                          \
  F(int, num_topk, 0, "K of the weights; 0: no weights")                                                         \
  F(int, num_tokens, 0, "N of the dispatch")                                                                     \
  F(bool const*, is_token_in_rank, nullptr, "[N, R] of the dispatch")                                            \
  F(int32_t const*, recv_channel_prefix_matrix, nullptr, "[R, C + 1] of the dispatch")                          \
  F(void*, combined_x, nullptr, "[N, hidden] of element_kind, out")                                              \
  F(float*, combined_topk_weights, nullptr, "[N, K] out, or null: no weights")                                   \
  F(int32_t const*, call_verdict, nullptr, "[3] or null: a notify's call_agreed + call_mismatch; not 1: do nothing")
// intranode_combine: the combine fields, plus x's rows along a dispatch counted on the device (its padded
// row count): a row past them (that dispatch overflowed, and reported it) is read from the last row, so the
// sender stays inside x.
#define EPCOMM_INTRANODE_COMBINE_FIELDS(F) \
  EPCOMM_COMBINE_FIELDS(F)                 \
  F(int, x_rows, -1, "rows of x; -1: exactly the dispatch's count (read by the host)")
struct IntranodeCombineParams {
  using Spec = IntranodeSpec;
  static constexpr char const* kName = "intranode_combine";
  EPCOMM_INTRANODE_COMBINE_FIELDS(EPCOMM_DECLARE_FIELD)
};
struct IntranodeCombineArgs : WithComm<CommArgs>, IntranodeCombineParams {
  using Params = IntranodeCombineParams;
};

// Args travel to a kernel by value; CUDA's classic limit for kernel parameters is 4 KiB.
inline constexpr size_t kMaxKernelParamBytes = 4096;
template <class Args>
inline constexpr bool kFitsKernelParams = sizeof(Args) <= kMaxKernelParamBytes;
static_assert(kFitsKernelParams<NotifyArgs> && kFitsKernelParams<IntranodeDispatchArgs> &&
                  kFitsKernelParams<IntranodeCombineArgs>,
              "intranode kernel Args exceed the 4 KiB of kernel parameters");

// Threads per block and blocks per grid of each kernel (the same on both targets).
inline constexpr int kLayoutThreads = 256;
inline constexpr int kNotifyThreads = 256;
inline constexpr int kIntranodeBlocksPerChannel = 2;  // sender 2c, receiver 2c + 1: they wait on each other
inline int comm_block_threads(int num_ranks) { return 32 * num_ranks; }  // one warp per peer
inline int comm_num_blocks(KernelConfig const& config) { return kIntranodeBlocksPerChannel * config.num_channels; }
inline int layout_num_blocks(int num_experts, int num_ranks) {
  return (num_experts + kLayoutThreads - 1) / kLayoutThreads + (num_ranks + kLayoutThreads - 1) / kLayoutThreads;
}

// Tokens the combine receiver reduces per round (see intranode_combine.cuh).
EPCOMM_HOST_DEVICE int combine_batch_tokens(KernelConfig const& config) {
  return min_int(kMaxCombineBatchTokens, config.nvl_ring_tokens - config.nvl_chunk_send_tokens + 1);
}

// Host-side validation of every Args struct: intranode_validate.hpp.

// CUDA target (intranode_launch.cu): enqueues on `stream` (a cudaStream_t); returns a cudaError_t.
// dispatch and combine first check that their grid fits the device at once (co_residency.hpp): if it
// does not they launch nothing, return kCoResidencyRefused and fill *refused (when given).
struct CoResidency;
int cuda_launch_get_dispatch_layout(LayoutArgs const& args, void* stream);
int cuda_launch_notify(NotifyArgs const& args, void* stream);
int cuda_launch_intranode_dispatch(IntranodeDispatchArgs const& args, void* stream,
                                   CoResidency* refused = nullptr);
int cuda_launch_intranode_combine(IntranodeCombineArgs const& args, void* stream,
                                  CoResidency* refused = nullptr);
// Blocks of the dispatch and of the combine kernel (the smaller count) one SM holds at `threads_per_block`,
// as the occupancy API answers for an idle device; a cudaError_t. For callers that run several grids of
// these kernels at once on one GPU (make gpu-check's fake ranks), which the per-grid check cannot see.
int cuda_intranode_blocks_per_sm(int threads_per_block, int* blocks_per_sm);

}  // namespace epcomm::kernels

#if EPCOMM_TARGET_SIMT
namespace epcomm::kernels {

// CPU target (intranode_launch_simt.cpp). launch_*: runs one rank's grid and
// waits (one process per rank, or one host thread per rank). add_*: adds one
// rank's grid to a ConcurrentLaunch (all ranks in one process). An invalid
// argument comes back as ErrorKind::InvalidConfig (launch_*) or a thrown
// std::invalid_argument (add_*); kernel-detected failures land in the ErrorSlot.
simt::LaunchStatus launch_get_dispatch_layout(LayoutArgs const& args, simt::LaunchOptions options = {});
simt::LaunchStatus launch_notify(NotifyArgs const& args, simt::LaunchOptions options = {});
simt::LaunchStatus launch_intranode_dispatch(IntranodeDispatchArgs const& args, simt::LaunchOptions options = {});
simt::LaunchStatus launch_intranode_combine(IntranodeCombineArgs const& args, simt::LaunchOptions options = {});
void add_notify(simt::ConcurrentLaunch& launch, NotifyArgs const& args);
void add_intranode_dispatch(simt::ConcurrentLaunch& launch, IntranodeDispatchArgs const& args);
void add_intranode_combine(simt::ConcurrentLaunch& launch, IntranodeCombineArgs const& args);

// A watchdog limit comfortably above the kernels' own timeout, so the kernel reports first.
simt::LaunchOptions default_launch_options(char const* name, long long timeout_cycles);

}  // namespace epcomm::kernels
#endif
