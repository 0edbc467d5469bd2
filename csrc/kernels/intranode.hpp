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

// notify: a barrier over peer memory (every rank's signal counter reaches
// `epoch`), which also resets this rank's ring counters. With exchange_counts
// it also sends this rank's per-(peer, channel) and per-expert counts and builds
// the prefix matrices that place every received row.
struct NotifyArgs {
  CommArgs comm;
  int64_t epoch = 0;  // 1, 2, 3, ...: one more per notify call on this buffer, the same on every rank
  bool exchange_counts = false;
  // inputs (exchange_counts only)
  bool const* is_token_in_rank = nullptr;            // [N, R]
  int32_t const* num_tokens_per_expert = nullptr;    // [E] (null: no per-expert counts)
  int num_tokens = 0;
  int expert_alignment = 1;
  // outputs (exchange_counts only)
  int32_t* recv_rank_prefix = nullptr;              // [R + 1]: rows from sources < s start at [s]; [R] = M
  int32_t* recv_channel_prefix_matrix = nullptr;    // [R, C + 1]: first row of (source s, channel c); [s][C] = end of s
  int32_t* num_recv_tokens_per_expert = nullptr;    // [L], each rounded up to expert_alignment
};

// intranode_dispatch: rows of x (+ optional scale bytes) go to every rank that
// holds one of the token's experts; received rows are ordered by source rank, then source token.
struct IntranodeDispatchArgs {
  CommArgs comm;
  void const* x = nullptr;        // [N, hidden_bytes] opaque row bytes (bf16 or e4m3)
  int hidden_bytes = 0;           // multiple of 4
  void const* x_scales = nullptr; // [N, scale_bytes] opaque (FP8 scales); null when scale_bytes == 0
  int scale_bytes = 0;            // multiple of 4
  int64_t const* topk_idx = nullptr;    // [N, K]; used when num_topk > 0
  float const* topk_weights = nullptr;  // [N, K]; when recv_topk_weights is set (on every rank)
  int num_topk = 0;                     // 0: no topk metadata travels
  int num_experts = 0, num_tokens = 0;
  bool const* is_token_in_rank = nullptr;               // [N, R]
  int32_t const* recv_channel_prefix_matrix = nullptr;  // [R, C + 1] from notify
  // outputs, M rows
  void* recv_x = nullptr;               // [M, hidden_bytes]
  void* recv_x_scales = nullptr;        // [M, scale_bytes]
  int64_t* recv_topk_idx = nullptr;     // [M, K] or null: local expert ids, -1 for experts of other ranks
  float* recv_topk_weights = nullptr;   // [M, K] or null: 0 where recv_topk_idx is -1
  int32_t* recv_src_idx = nullptr;      // [M]: token index on the source rank
};

// intranode_combine: the reverse path; out[t] = dtype(0 + (0 + row_d0 + row_d1 + ...)) in fp32 over the
// ranks d holding token t, ascending, rounded once to the rows' dtype. Weights (optional) are summed the same way.
struct IntranodeCombineArgs {
  CommArgs comm;
  void const* x = nullptr;                 // [M, hidden] of element_kind, rows in this rank's dispatch order
  ElementKind element_kind = ElementKind::kBfloat16;
  float const* topk_weights = nullptr;     // [M, K]; travels when combined_topk_weights is set (on every rank)
  int hidden = 0, num_topk = 0, num_tokens = 0;
  bool const* is_token_in_rank = nullptr;               // [N, R] of the dispatch
  int32_t const* recv_channel_prefix_matrix = nullptr;  // [R, C + 1] of the dispatch
  void* combined_x = nullptr;              // [N, hidden] of element_kind, out
  float* combined_topk_weights = nullptr;  // [N, K] out, or null: no weights
};

// Threads per block and blocks per grid of each kernel (the same on both targets).
inline constexpr int kLayoutThreads = 256;
inline constexpr int kNotifyThreads = 256;
inline int comm_block_threads(int num_ranks) { return 32 * num_ranks; }  // one warp per peer
inline int comm_num_blocks(KernelConfig const& config) { return 2 * config.num_channels; }
inline int layout_num_blocks(int num_experts, int num_ranks) {
  return (num_experts + kLayoutThreads - 1) / kLayoutThreads + (num_ranks + kLayoutThreads - 1) / kLayoutThreads;
}

// Tokens the combine receiver reduces per round (see intranode_combine.cuh).
EPCOMM_HOST_DEVICE int combine_batch_tokens(KernelConfig const& config) {
  return min_int(kMaxCombineBatchTokens, config.nvl_ring_tokens - config.nvl_chunk_send_tokens + 1);
}

// Host-side validation of every Args struct: intranode_validate.hpp.

// CUDA target (intranode_launch.cu): enqueues on `stream` (a cudaStream_t); returns a cudaError_t.
int cuda_launch_get_dispatch_layout(LayoutArgs const& args, void* stream);
int cuda_launch_notify(NotifyArgs const& args, void* stream);
int cuda_launch_intranode_dispatch(IntranodeDispatchArgs const& args, void* stream);
int cuda_launch_intranode_combine(IntranodeCombineArgs const& args, void* stream);

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
