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
#include "../transport/transport.cuh"
#include "config.cuh"
#include "error.cuh"
#include "intranode.hpp"
#include "rdma_workspace.cuh"
#include "workspace.cuh"

namespace epcomm::kernels {

using transport::WarpCoop;  // who takes part in a transport call (transport/transport.cuh)

// The parts every internode kernel shares.
template <class Transport>
struct InternodeComm {
  static_assert(transport::DeviceTransport<Transport>,
                "Transport must model the concept of transport/transport.cuh (rank, num_ranks, local_buffer, "
                "put_signal, signal_add, read_signal, flush; trivially copyable)");
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

// What Python passes to run an internode kernel besides its Params: the kernel config, the RDMA
// workspace shape, the NVL row size and where the RDMA region starts in each rank's buffer (after
// the NVL region). The NVL workspace follows from them (internode_nvl_shape). The same on every rank.
#define EPCOMM_INTERNODE_SPEC_FIELDS(F)                                                                      \
  F(InternodeConfig, config, {}, "NVL and network chunk/ring sizes (from the call's Config)")             \
  F(RdmaWorkspaceShape, workspace, {}, "the RDMA region's shape (nodes, ranks per node, rows, node cap)") \
  F(int, nvl_max_row_bytes, 0, "largest NVL row: a dispatch row or a combine row of x's dtype")          \
  F(int64_t, rdma_offset, 0, "byte offset of the RDMA region in each rank's buffer (page-aligned)")
struct InternodeSpec {
  EPCOMM_INTERNODE_SPEC_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(InternodeSpec const&) const = default;
};

// The NVL region of the internode path: one node's ranks, rows of either direction.
inline NvlWorkspaceShape internode_nvl_shape(InternodeSpec const& spec) {
  // (per-expert counts: notify writes a node peer's counts into its NVL buffer, the network's into messages)
  return {spec.workspace.num_nvl_ranks, spec.workspace.num_local_experts, spec.workspace.num_topk,
          spec.nvl_max_row_bytes};
}

// internode_notify: a barrier over all ranks (NVL signals on the node, transport
// signals across nodes) which also resets this rank's NVL ring counters. With
// exchange_counts every rank also sends its counts and builds the prefixes.
// recv_rank_prefix and recv_channel_prefix_matrix are as intranode.
#define EPCOMM_INTERNODE_NOTIFY_FIELDS(F) \
  EPCOMM_NOTIFY_FIELDS(F)                 \
  F(int32_t*, forward_channel_prefix_matrix, nullptr, \
    "[NN, C + 1] out: this rank as forwarder: first forwarded row of (source node m, channel c); [m][C] = end of m") \
  F(bool, reset_signals, false, \
    "re-layout: after the barrier, wait for the adds still due to this rank's transport signals, then zero them " \
    "and their bases (internode_notify.cuh); the caller meets every rank before the next kernel")
struct InternodeNotifyParams {
  using Spec = InternodeSpec;
  static constexpr char const* kName = "internode_notify";
  EPCOMM_INTERNODE_NOTIFY_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct InternodeNotifyArgs : WithComm<InternodeComm<Transport>>, InternodeNotifyParams {
  using Params = InternodeNotifyParams;
};

// The transport's byte counters: it adds the bytes this rank put per link class (self, nvlink, network).
#define EPCOMM_TRANSPORT_COUNTER_FIELD(F) \
  F(uint64_t*, byte_counters, nullptr, "[3] in/out or null: bytes put per link class (self, nvlink, network)")

// internode_dispatch. Channel c is blocks 3c (network senders), 3c + 1
// (forwarders + coordinator), 3c + 2 (NVL receivers). The dispatch fields as intranode, plus:
#define EPCOMM_INTERNODE_DISPATCH_FIELDS(F)                                                              \
  EPCOMM_DISPATCH_FIELDS(F)                                                                              \
  F(int32_t const*, forward_channel_prefix_matrix, nullptr, "[NN, C + 1] from notify")                 \
  F(uint32_t*, forward_peer_masks, nullptr, "[forwarded rows] out: which local ranks got forwarded row i (for combine)") \
  EPCOMM_TRANSPORT_COUNTER_FIELD(F)
struct InternodeDispatchParams {
  using Spec = InternodeSpec;
  static constexpr char const* kName = "internode_dispatch";
  EPCOMM_INTERNODE_DISPATCH_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct InternodeDispatchArgs : WithComm<InternodeComm<Transport>>, InternodeDispatchParams {
  using Params = InternodeDispatchParams;
  int max_nodes_per_token = kDefaultMaxNodesPerToken;  // the routing's bound; <= the workspace's (from the spec)
};

// internode_combine: out[t] = dtype(0 + P_0 + P_1 + ...) over nodes ascending, P_n = 0 + row_d + ... over
// the ranks d of node n holding t, ascending (fp32), then rounded to node_partial_kind, the dtype P_n
// crosses the network in (the rows' dtype: DeepEP's bytes; fp32: one rounding); the sum over nodes is
// fp32. Rows are bf16, fp16 or fp32. Weights likewise, always fp32. Same
// blocks as dispatch: 3c (NVL senders), 3c + 1 (forwarder), 3c + 2 (network receiver). The combine fields
// as intranode (num_topk: the same on every rank; weights travel when num_topk > 0), plus:
#define EPCOMM_INTERNODE_COMBINE_FIELDS(F)                                                     \
  EPCOMM_COMBINE_FIELDS(F)                                                                     \
  F(int32_t const*, forward_channel_prefix_matrix, nullptr, "[NN, C + 1] of the dispatch")   \
  F(uint32_t const*, forward_peer_masks, nullptr, "of the dispatch")                           \
  F(ElementKind, node_partial_kind, ElementKind::kFloat32,                                      \
    "dtype node partials cross the network in: the rows' (DeepEP's bytes), fp32, or the caller's " \
    "when its rows come as fp32 (combine with bias)")                                           \
  EPCOMM_TRANSPORT_COUNTER_FIELD(F)
struct InternodeCombineParams {
  using Spec = InternodeSpec;
  static constexpr char const* kName = "internode_combine";
  EPCOMM_INTERNODE_COMBINE_FIELDS(EPCOMM_DECLARE_FIELD)
};
template <class Transport>
struct InternodeCombineArgs : WithComm<InternodeComm<Transport>>, InternodeCombineParams {
  using Params = InternodeCombineParams;
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

// CUDA target (internode_launch.cu): enqueues on `stream`; returns a cudaError_t. dispatch and combine
// first check that their 3 x C blocks fit the device at once, as intranode.hpp's (co_residency.hpp).
int cuda_launch_internode_notify(InternodeNotifyArgs<transport::ShmTransport> const& args, void* stream);
int cuda_launch_internode_dispatch(InternodeDispatchArgs<transport::ShmTransport> const& args, void* stream,
                                   CoResidency* refused = nullptr);
int cuda_launch_internode_combine(InternodeCombineArgs<transport::ShmTransport> const& args, void* stream,
                                  CoResidency* refused = nullptr);
// As cuda_intranode_blocks_per_sm (intranode.hpp), for the internode dispatch and combine kernels over ShmTransport.
int cuda_internode_blocks_per_sm(int threads_per_block, int* blocks_per_sm);

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
