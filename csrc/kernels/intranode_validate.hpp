#pragma once
// Host-side argument checks shared by the CUDA and CPU launchers. Each returns
// nullptr when the arguments are usable, else a static message naming the field.

#include "intranode.hpp"

namespace epcomm::kernels {

inline char const* validate(LayoutArgs const& args) {
  if (args.num_ranks < 1) return "get_dispatch_layout: num_ranks must be >= 1";
  if (args.num_experts < 1 || args.num_experts % args.num_ranks != 0)
    return "get_dispatch_layout: num_experts must be a positive multiple of num_ranks";
  if (args.num_tokens < 0 || args.num_topk < 0) return "get_dispatch_layout: num_tokens and num_topk must be >= 0";
  if (args.num_tokens > 0 && args.num_topk > 0 && args.topk_idx == nullptr) return "get_dispatch_layout: topk_idx is null";
  if (args.num_tokens_per_rank == nullptr || args.num_tokens_per_expert == nullptr ||
      (args.num_tokens > 0 && args.is_token_in_rank == nullptr))
    return "get_dispatch_layout: an output pointer is null";
  return nullptr;
}

inline char const* validate(CommArgs const& comm) {
  if (char const* problem = validate_config(comm.config, comm.num_ranks)) return problem;
  if (comm.rank < 0 || comm.rank >= comm.num_ranks) return "rank must be in [0, num_ranks)";
  if (comm.peer_buffers == nullptr) return "peer_buffers is null";
  NvlWorkspace const& ws = comm.workspace;
  if (ws.num_ranks != comm.num_ranks || ws.num_channels != comm.config.num_channels ||
      ws.ring_tokens != comm.config.nvl_ring_tokens)
    return "workspace was laid out for another num_ranks / num_channels / nvl_ring_tokens";
  if (comm.timeout_cycles <= 0) return "timeout_cycles must be > 0";
  return nullptr;
}

inline char const* validate(NotifyArgs const& args) {
  if (char const* problem = validate(args.comm)) return problem;
  if (char const* problem = validate_call_check(args)) return problem;
  if (!args.exchange_counts) return nullptr;
  if (args.num_tokens < 0) return "notify: num_tokens must be >= 0";
  if (args.num_tokens > 0 && args.is_token_in_rank == nullptr) return "notify: is_token_in_rank is null";
  if (args.recv_rank_prefix == nullptr || args.recv_channel_prefix_matrix == nullptr)
    return "notify: recv_rank_prefix / recv_channel_prefix_matrix is null";
  if (args.expert_alignment < 1) return "notify: expert_alignment must be >= 1";
  if (args.num_tokens_per_expert != nullptr &&
      (args.comm.workspace.num_local_experts < 1 || args.num_recv_tokens_per_expert == nullptr))
    return "notify: per-expert counts need workspace.num_local_experts > 0 and num_recv_tokens_per_expert";
  return nullptr;
}

inline char const* validate(IntranodeDispatchArgs const& args) {
  if (char const* problem = validate(args.comm)) return problem;
  NvlWorkspace const& ws = args.comm.workspace;
  if (args.hidden_bytes <= 0 || args.hidden_bytes % 4 != 0) return "dispatch: hidden_bytes must be a positive multiple of 4";
  if (args.scale_bytes < 0 || args.scale_bytes % 4 != 0) return "dispatch: scale_bytes must be a multiple of 4";
  if (size_t(args.hidden_bytes) + size_t(args.scale_bytes) > ws.row_bytes)
    return "dispatch: hidden_bytes + scale_bytes exceed the workspace's max_row_bytes";
  if (args.scale_bytes > 0 && args.num_tokens > 0 && args.x_scales == nullptr) return "dispatch: x_scales is null";
  if (args.num_tokens < 0) return "dispatch: num_tokens must be >= 0";
  if (args.num_tokens > 0 && (args.x == nullptr || args.is_token_in_rank == nullptr))
    return "dispatch: x / is_token_in_rank is null";
  if (args.recv_channel_prefix_matrix == nullptr) return "dispatch: recv_channel_prefix_matrix is null";
  if (args.recv_capacity < -1) return "dispatch: recv_capacity must be -1 (the host read the count) or >= 0";
  if (args.num_topk < 0 || args.num_topk > ws.num_topk) return "dispatch: num_topk must be in [0, workspace num_topk]";
  if (args.num_topk > 0) {
    if (args.num_tokens > 0 && args.topk_idx == nullptr) return "dispatch: topk_idx is null";
    if (args.num_tokens > 0 && args.recv_topk_weights != nullptr && args.topk_weights == nullptr)
      return "dispatch: recv_topk_weights needs topk_weights";
    if (args.num_experts < 1 || args.num_experts % args.comm.num_ranks != 0)
      return "dispatch: num_experts must be a positive multiple of num_ranks";
  }
  return nullptr;
}

inline char const* validate(IntranodeCombineArgs const& args) {
  if (char const* problem = validate(args.comm)) return problem;
  NvlWorkspace const& ws = args.comm.workspace;
  if (!is_element_kind(int32_t(args.element_kind))) return "combine: element_kind must be bfloat16, float16 or float32";
  int const element_size = element_bytes(args.element_kind);
  if (args.hidden <= 0 || args.hidden * element_size % 4 != 0)
    return "combine: hidden must be positive and its rows a multiple of 4 bytes (even hidden for 16-bit rows)";
  if (size_t(args.hidden) * element_size > ws.row_bytes)
    return "combine: hidden x element bytes exceed the workspace's max_row_bytes";
  if (args.num_tokens < 0) return "combine: num_tokens must be >= 0";
  if (args.num_tokens > 0 && (args.is_token_in_rank == nullptr || args.combined_x == nullptr))
    return "combine: is_token_in_rank / combined_x is null";
  if (args.recv_channel_prefix_matrix == nullptr) return "combine: recv_channel_prefix_matrix is null";
  if (args.x_rows == 0 || args.x_rows < -1) return "combine: x_rows must be -1 (the host read the count) or > 0";
  if (args.combined_topk_weights != nullptr && (args.num_topk < 1 || args.num_topk > ws.num_topk))
    return "combine: combined_topk_weights needs num_topk in [1, workspace num_topk]";
  if (combine_batch_tokens(args.comm.config) < 1) return "combine: nvl_ring_tokens < nvl_chunk_send_tokens";
  return nullptr;
}

}  // namespace epcomm::kernels
