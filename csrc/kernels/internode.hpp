#pragma once
// Argument structs and host launchers of the internode (network + NVLink) path:
//   get_dispatch_layout -> internode_notify -> internode_dispatch -> (experts)
//   -> internode_notify (barrier) -> internode_combine
// Rank r is local rank r % L of node r / L. Dispatch is two-hop: a token goes
// once per destination node over the network to the rank of that node with the
// sender's local index (its forwarder), which copies it over NVLink to every
// rank of its node that needs it. Combine is the reverse: each forwarder reduces
// its node's rows of a token into one fp32 partial that crosses the network once.
//
// Sizes: N = num_tokens (this rank), R = num_ranks, L = num_nvl_ranks,
// NN = num_nodes = R / L, C = config.nvl.num_channels, K = num_topk, E = num_experts.
// Kernels are templates over the Transport (transport.cuh); the launchers here
// use ShmTransport (peer pointers). Errors: as intranode.hpp (ErrorSlot, abort
// flag in the NVL buffers of this node, carried to the other nodes by each kernel's abort
// watcher through the transport's abort signal; see internode_common.cuh).

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "../transport/shm_transport.cuh"
#include "config.cuh"
#include "error.cuh"
#include "intranode.hpp"
#include "rdma_workspace.cuh"
#include "workspace.cuh"

namespace epcomm::kernels {

// The parts every internode kernel shares.
template <class Transport>
struct InternodeComm {
  int rank = 0, num_ranks = 1, num_nvl_ranks = 1;
  InternodeConfig config;
  NvlWorkspace nvl_workspace;   // laid out with num_ranks = L; the same on every rank
  RdmaWorkspace rdma_workspace;  // the same on every rank
  void* const* nvl_peer_buffers = nullptr;  // [L] NVL buffer base of each rank of this node, by local rank
  Transport transport;
  ErrorSlot* error = nullptr;
  long long timeout_cycles = kDefaultTimeoutCycles;

  EPCOMM_HOST_DEVICE int node() const { return rank / num_nvl_ranks; }
  EPCOMM_HOST_DEVICE int local_rank() const { return rank % num_nvl_ranks; }
  EPCOMM_HOST_DEVICE int num_nodes() const { return num_ranks / num_nvl_ranks; }
};

// internode_notify: a barrier over all ranks (NVL signals on the node, transport
// signals across nodes) which also resets this rank's NVL ring counters. With
// exchange_counts every rank also sends its counts and builds the prefixes.
template <class Transport>
struct InternodeNotifyArgs {
  InternodeComm<Transport> comm;
  int64_t epoch = 0;  // 1, 2, 3, ...: one more per notify call, the same on every rank
  bool exchange_counts = false;
  // inputs (exchange_counts only)
  bool const* is_token_in_rank = nullptr;          // [N, R]
  int32_t const* num_tokens_per_expert = nullptr;  // [E] (null: no per-expert counts)
  int num_tokens = 0;
  int expert_alignment = 1;
  // outputs (exchange_counts only)
  int32_t* recv_rank_prefix = nullptr;            // [R + 1] as intranode
  int32_t* recv_channel_prefix_matrix = nullptr;  // [R, C + 1] as intranode: first row of (source s, channel c)
  int32_t* forward_channel_prefix_matrix = nullptr;  // [NN, C + 1]: this rank as forwarder: first forwarded row
                                                     // of (source node m, channel c); [m][C] = end of m
  int32_t* num_recv_tokens_per_expert = nullptr;  // [E / R], each rounded up to expert_alignment
};

// internode_dispatch. Channel c is blocks 3c (network senders), 3c + 1
// (forwarders + coordinator), 3c + 2 (NVL receivers).
template <class Transport>
struct InternodeDispatchArgs {
  InternodeComm<Transport> comm;
  void const* x = nullptr;  // [N, hidden_bytes] opaque row bytes (bf16 or e4m3)
  int hidden_bytes = 0;     // multiple of 4
  void const* x_scales = nullptr;  // [N, scale_bytes]; null when scale_bytes == 0
  int scale_bytes = 0;             // multiple of 4
  int64_t const* topk_idx = nullptr;    // [N, K]
  float const* topk_weights = nullptr;  // [N, K] (null: weights 0)
  int num_topk = 0, num_experts = 0, num_tokens = 0;
  int max_nodes_per_token = kDefaultMaxNodesPerToken;  // the routing's bound; <= the workspace's
  bool const* is_token_in_rank = nullptr;                  // [N, R]
  int32_t const* recv_channel_prefix_matrix = nullptr;     // [R, C + 1] from notify
  int32_t const* forward_channel_prefix_matrix = nullptr;  // [NN, C + 1] from notify
  // outputs
  void* recv_x = nullptr;              // [M, hidden_bytes]
  void* recv_x_scales = nullptr;       // [M, scale_bytes]
  int64_t* recv_topk_idx = nullptr;    // [M, K] or null: local expert ids, -1 for experts of other ranks
  float* recv_topk_weights = nullptr;  // [M, K] or null: 0 where recv_topk_idx is -1
  int32_t* recv_src_idx = nullptr;     // [M]: token index on the source rank
  uint32_t* forward_peer_masks = nullptr;  // [forwarded rows]: which local ranks got forwarded row i (for combine)
};

// internode_combine: out[t] = dtype(0 + P_0 + P_1 + ...) over nodes ascending, P_n = 0 + row_d + ... over
// the ranks d of node n holding t, ascending (fp32); rows are bf16, fp16 or fp32. Weights likewise. Same blocks as dispatch:
// 3c (NVL senders), 3c + 1 (forwarder), 3c + 2 (network receiver).
template <class Transport>
struct InternodeCombineArgs {
  InternodeComm<Transport> comm;
  void const* x = nullptr;              // [M, hidden] of element_kind, in this rank's dispatch order
  ElementKind element_kind = ElementKind::kBfloat16;
  float const* topk_weights = nullptr;  // [M, K] (null when M == 0); weights travel when num_topk > 0
  int hidden = 0, num_topk = 0, num_tokens = 0;  // num_topk: 0 = no weights; the same on every rank
  bool const* is_token_in_rank = nullptr;                  // [N, R] of the dispatch
  int32_t const* recv_channel_prefix_matrix = nullptr;     // [R, C + 1] of the dispatch
  int32_t const* forward_channel_prefix_matrix = nullptr;  // [NN, C + 1] of the dispatch
  uint32_t const* forward_peer_masks = nullptr;            // of the dispatch
  void* combined_x = nullptr;              // [N, hidden] of element_kind, out
  float* combined_topk_weights = nullptr;  // [N, K] out, or null
};

// Threads per block and blocks per grid (the same on both targets).
inline constexpr int kInternodeNotifyThreads = 256;
inline constexpr int kInternodeNotifyBlocks = 2;  // the work, and the abort watcher
inline constexpr int kInternodeBlocksPerChannel = 3;
inline constexpr int kMaxInternodeWarps = 32;
// Warps per block a Transport's kernels are compiled for (__launch_bounds__): 32 unless the transport says
// fewer (a heavier transport, e.g. GIN, needs the registers that 1024-thread blocks cannot have).
template <class Transport>
constexpr int max_block_warps() {
  if constexpr (requires { Transport::kMaxBlockWarps; }) return Transport::kMaxBlockWarps;
  return kMaxInternodeWarps;
}
// Network senders: one warp per node; forwarders: one per NVL peer + the coordinator; receivers: one per forwarder.
EPCOMM_HOST_DEVICE int internode_block_warps(int num_nodes, int num_nvl_ranks) {
  return num_nodes > num_nvl_ranks + 1 ? num_nodes : num_nvl_ranks + 1;
}
inline int internode_block_threads(int num_nodes, int num_nvl_ranks) {
  return 32 * internode_block_warps(num_nodes, num_nvl_ranks);
}
inline int internode_num_blocks(InternodeConfig const& config) {
  return kInternodeBlocksPerChannel * config.nvl.num_channels;
}

// Combine batches (tokens reduced per round), so that no reducer waits for a row its producer cannot write:
//   forwarder: reserves its batch of network slots at once (<= rdma_chunk_tokens) and waits for NVL rows
//              of a producer that reserves nvl_chunk_send_tokens (<= nvl_ring - nvl_chunk + 1);
//   receiver:  waits for network rows of a forwarder that reserves <= rdma_chunk_tokens (<= rdma_ring - rdma_chunk + 1).
EPCOMM_HOST_DEVICE int internode_forwarder_batch_tokens(InternodeConfig const& config) {
  int const nvl = config.nvl.nvl_ring_tokens - config.nvl.nvl_chunk_send_tokens + 1;
  return min_int(kMaxCombineBatchTokens, min_int(nvl, config.rdma_chunk_tokens));
}
EPCOMM_HOST_DEVICE int internode_receiver_batch_tokens(InternodeConfig const& config) {
  return min_int(kMaxCombineBatchTokens, config.rdma_ring_tokens - config.rdma_chunk_tokens + 1);
}

using ShmInternodeComm = InternodeComm<transport::ShmTransport>;

// CUDA target (internode_launch.cu): enqueues on `stream`; returns a cudaError_t.
int cuda_launch_internode_notify(InternodeNotifyArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_internode_dispatch(InternodeDispatchArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_internode_combine(InternodeCombineArgs<transport::ShmTransport> const& args, void* stream);

}  // namespace epcomm::kernels

#if EPCOMM_TARGET_SIMT
namespace epcomm::kernels {

// CPU target (internode_launch_simt.cpp): add one rank's grid to a ConcurrentLaunch
// (all ranks in one process). Invalid arguments throw std::invalid_argument.
void add_internode_notify(simt::ConcurrentLaunch& launch, InternodeNotifyArgs<transport::ShmTransport> const& args);
void add_internode_dispatch(simt::ConcurrentLaunch& launch, InternodeDispatchArgs<transport::ShmTransport> const& args);
void add_internode_combine(simt::ConcurrentLaunch& launch, InternodeCombineArgs<transport::ShmTransport> const& args);

}  // namespace epcomm::kernels
#endif
