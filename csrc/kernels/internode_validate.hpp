#pragma once
// Host-side checks of the internode Args structs, shared by the CUDA and CPU
// launchers. Each returns nullptr when usable, else a message naming the field,
// its value and the rule (formatted into a per-thread buffer: copy it before the
// next call on the same thread).

#include <cstdarg>
#include <cstdio>

#include "internode.hpp"

namespace epcomm::kernels {

namespace detail {
inline char const* invalid(char const* format, ...) {
  thread_local char message[256];
  va_list arguments;
  va_start(arguments, format);
  std::vsnprintf(message, sizeof(message), format, arguments);
  va_end(arguments);
  return message;
}
}  // namespace detail

template <class Transport>
char const* validate(InternodeComm<Transport> const& comm) {
  using detail::invalid;
  int const L = comm.num_nvl_ranks;
  if (L < 1 || L > kMaxInternodeNvlRanks)
    return invalid("internode: num_nvl_ranks=%d must be in [1, %d] (forwarder block: one warp per peer + a coordinator)",
                   L, kMaxInternodeNvlRanks);
  if (comm.num_ranks < 1 || comm.num_ranks % L != 0)
    return invalid("internode: num_ranks=%d must be a positive multiple of num_nvl_ranks=%d", comm.num_ranks, L);
  int const num_nodes = comm.num_ranks / L;
  if (num_nodes > kMaxNodes)
    return invalid("internode: num_nodes=%d must be <= %d (one sender warp per node)", num_nodes, kMaxNodes);
  if (internode_block_warps(num_nodes, L) > max_block_warps<Transport>())
    return invalid("internode: %d nodes x %d ranks need %d warps per block; this transport's kernels are built for "
                   "at most %d (nodes <= %d and ranks per node <= %d)", num_nodes, L, internode_block_warps(num_nodes, L),
                   max_block_warps<Transport>(), max_block_warps<Transport>(), max_block_warps<Transport>() - 1);
  if (comm.rank < 0 || comm.rank >= comm.num_ranks)
    return invalid("internode: rank=%d must be in [0, num_ranks=%d)", comm.rank, comm.num_ranks);
  if (char const* problem = validate_config(comm.config.nvl, L)) return problem;
  if (comm.config.rdma_chunk_tokens < 1 || comm.config.rdma_ring_tokens < comm.config.rdma_chunk_tokens)
    return invalid("internode: rdma_ring_tokens=%d must be >= rdma_chunk_tokens=%d >= 1", comm.config.rdma_ring_tokens,
                   comm.config.rdma_chunk_tokens);
  if (comm.nvl_peer_buffers == nullptr) return "internode: nvl_peer_buffers is null";
  NvlWorkspace const& nvl = comm.nvl_workspace;
  if (nvl.num_ranks != L || nvl.num_channels != comm.config.nvl.num_channels ||
      nvl.ring_tokens != comm.config.nvl.nvl_ring_tokens)
    return invalid("internode: nvl_workspace was laid out for num_ranks=%d num_channels=%d nvl_ring_tokens=%d, "
                   "not L=%d / %d / %d", nvl.num_ranks, nvl.num_channels, nvl.ring_tokens, L,
                   comm.config.nvl.num_channels, comm.config.nvl.nvl_ring_tokens);
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  if (rdma.num_nodes != num_nodes || rdma.num_nvl_ranks != L || rdma.num_channels != comm.config.nvl.num_channels ||
      rdma.ring_tokens != comm.config.rdma_ring_tokens)
    return invalid("internode: rdma_workspace was laid out for %d nodes x %d ranks, %d channels, ring %d; "
                   "the call has %d x %d, %d, %d", rdma.num_nodes, rdma.num_nvl_ranks, rdma.num_channels,
                   rdma.ring_tokens, num_nodes, L, comm.config.nvl.num_channels, comm.config.rdma_ring_tokens);
  if (rdma.num_local_experts != nvl.num_local_experts || rdma.num_topk != nvl.num_topk)
    return "internode: nvl_workspace and rdma_workspace disagree on num_local_experts / num_topk";
  if (comm.timeout_cycles <= 0) return "internode: timeout_cycles must be > 0";
  return nullptr;
}

template <class Transport>
char const* validate(InternodeNotifyArgs<Transport> const& args) {
  using detail::invalid;
  if (char const* problem = validate(args.comm)) return problem;
  if (char const* problem = validate_call_check(args)) return problem;
  if (!args.exchange_counts) return nullptr;
  if (args.num_tokens < 0) return invalid("internode_notify: num_tokens=%d must be >= 0", args.num_tokens);
  if (args.num_tokens > 0 && args.is_token_in_rank == nullptr) return "internode_notify: is_token_in_rank is null";
  if (args.recv_rank_prefix == nullptr || args.recv_channel_prefix_matrix == nullptr ||
      args.forward_channel_prefix_matrix == nullptr)
    return "internode_notify: recv_rank_prefix / recv_channel_prefix_matrix / forward_channel_prefix_matrix is null";
  if (args.expert_alignment < 1) return invalid("internode_notify: expert_alignment=%d must be >= 1", args.expert_alignment);
  if (args.num_tokens_per_expert != nullptr &&
      (args.comm.rdma_workspace.num_local_experts < 1 || args.num_recv_tokens_per_expert == nullptr))
    return "internode_notify: per-expert counts need workspace num_local_experts > 0 and num_recv_tokens_per_expert";
  return nullptr;
}

template <class Transport>
char const* validate(InternodeDispatchArgs<Transport> const& args) {
  using detail::invalid;
  if (char const* problem = validate(args.comm)) return problem;
  RdmaWorkspace const& rdma = args.comm.rdma_workspace;
  NvlWorkspace const& nvl = args.comm.nvl_workspace;
  if (args.hidden_bytes <= 0 || args.hidden_bytes % 4 != 0)
    return invalid("internode_dispatch: hidden_bytes=%d must be a positive multiple of 4", args.hidden_bytes);
  if (args.scale_bytes < 0 || args.scale_bytes % 4 != 0)
    return invalid("internode_dispatch: scale_bytes=%d must be a multiple of 4", args.scale_bytes);
  size_t const row_bytes = size_t(args.hidden_bytes) + size_t(args.scale_bytes);
  if (row_bytes > rdma.dispatch_row_bytes || row_bytes > nvl.row_bytes)
    return invalid("internode_dispatch: hidden_bytes + scale_bytes = %zu exceed the workspaces' max_row_bytes (%zu)",
                   row_bytes, rdma.dispatch_row_bytes);
  if (args.max_nodes_per_token < 1 || args.max_nodes_per_token > rdma.max_nodes_per_token)
    return invalid("internode_dispatch: max_nodes_per_token=%d must be in [1, %d], the bound the buffers were sized for",
                   args.max_nodes_per_token, rdma.max_nodes_per_token);
  if (args.num_tokens < 0) return invalid("internode_dispatch: num_tokens=%d must be >= 0", args.num_tokens);
  if (args.num_tokens > 0 && (args.x == nullptr || args.is_token_in_rank == nullptr))
    return "internode_dispatch: x / is_token_in_rank is null";
  if (args.scale_bytes > 0 && args.num_tokens > 0 && args.x_scales == nullptr) return "internode_dispatch: x_scales is null";
  if (args.recv_channel_prefix_matrix == nullptr || args.forward_channel_prefix_matrix == nullptr)
    return "internode_dispatch: recv_channel_prefix_matrix / forward_channel_prefix_matrix is null";
  if (args.num_topk < 0 || args.num_topk > rdma.num_topk)
    return invalid("internode_dispatch: num_topk=%d must be in [0, workspace num_topk=%d]", args.num_topk, rdma.num_topk);
  if (args.num_topk > 0) {
    if (args.num_tokens > 0 && args.topk_idx == nullptr) return "internode_dispatch: topk_idx is null";
    if (args.num_experts < 1 || args.num_experts % args.comm.num_ranks != 0)
      return invalid("internode_dispatch: num_experts=%d must be a positive multiple of num_ranks=%d", args.num_experts,
                     args.comm.num_ranks);
  }
  return nullptr;
}

template <class Transport>
char const* validate(InternodeCombineArgs<Transport> const& args) {
  using detail::invalid;
  if (char const* problem = validate(args.comm)) return problem;
  RdmaWorkspace const& rdma = args.comm.rdma_workspace;
  if (args.hidden <= 0 || args.hidden != rdma.hidden)
    return invalid("internode_combine: hidden=%d must equal the rdma_workspace's hidden=%d (partials are sized by it)",
                   args.hidden, rdma.hidden);
  if (!is_element_kind(int32_t(args.element_kind)))
    return invalid("internode_combine: element_kind=%d must be 1 (bf16), 2 (fp16) or 3 (fp32)", int(args.element_kind));
  if (!is_element_kind(int32_t(args.node_partial_kind)))
    return invalid("internode_combine: node_partial_kind=%d must be 1 (bf16), 2 (fp16) or 3 (fp32)",
                   int(args.node_partial_kind));
  int const row_bytes = args.hidden * element_bytes(args.element_kind);
  if (row_bytes % 4 != 0)
    return invalid("internode_combine: rows of %d bytes are not whole 4-byte words (use an even hidden)", row_bytes);
  // network slots are packed at the partial's bytes (rdma_workspace.cuh): 4-byte words keep the weights aligned
  int const partial_bytes = args.hidden * element_bytes(args.node_partial_kind);
  if (partial_bytes % 4 != 0)
    return invalid("internode_combine: node partials of %d bytes are not whole 4-byte words (use an even hidden)",
                   partial_bytes);
  if (size_t(row_bytes) > args.comm.nvl_workspace.row_bytes)
    return invalid("internode_combine: rows of %d bytes exceed the nvl_workspace's row bytes (%zu)", row_bytes,
                   args.comm.nvl_workspace.row_bytes);
  if (args.num_tokens < 0) return invalid("internode_combine: num_tokens=%d must be >= 0", args.num_tokens);
  if (args.num_tokens > 0 && (args.is_token_in_rank == nullptr || args.combined_x == nullptr))
    return "internode_combine: is_token_in_rank / combined_x is null";
  if (args.recv_channel_prefix_matrix == nullptr || args.forward_channel_prefix_matrix == nullptr ||
      args.forward_peer_masks == nullptr)
    return "internode_combine: a prefix matrix or forward_peer_masks (from the dispatch) is null";
  if (args.num_topk < 0 || args.num_topk > rdma.num_topk)
    return invalid("internode_combine: num_topk=%d must be in [0, workspace num_topk=%d]", args.num_topk, rdma.num_topk);
  if (internode_forwarder_batch_tokens(args.comm.config) < 1 || internode_receiver_batch_tokens(args.comm.config) < 1)
    return "internode_combine: ring sizes leave no batch (ring < chunk)";
  return nullptr;
}

}  // namespace epcomm::kernels
