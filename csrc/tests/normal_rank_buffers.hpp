#pragma once
// One rank's host buffers in a normal-mode round (layout -> notify -> dispatch -> combine), as the
// intranode and internode tests both drive it: every output is poisoned before the kernel that writes
// it, and the argument fields the two kernel families share (the same field lists, kernels/intranode.hpp)
// point at these buffers. What the outputs must hold comes from dispatch_reference.hpp.

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/intranode.hpp"
#include "dispatch_reference.hpp"
#include "harness.hpp"
#include "test_common.hpp"

namespace epcomm::test {

struct NormalRankBuffers {
  std::vector<int32_t> num_tokens_per_rank, num_tokens_per_expert;
  std::vector<uint8_t> is_token_in_rank;  // bool storage
  std::vector<int32_t> recv_rank_prefix, recv_channel_prefix, num_recv_tokens_per_expert;
  std::vector<uint8_t> recv_x, recv_x_scales;
  std::vector<int64_t> recv_topk_idx;
  std::vector<float> recv_topk_weights;
  std::vector<int32_t> recv_src_idx;
  std::vector<uint16_t> expert_out, combined_x;
  std::vector<float> combined_topk_weights;
  int32_t call_agreed = -1;

  int num_received() const { return recv_rank_prefix.back(); }  // M, once notify has run
  bool const* token_in_rank() const { return reinterpret_cast<bool const*>(is_token_in_rank.data()); }
};

// get_dispatch_layout on this rank's tokens (a single-rank kernel); which ranks each token goes to must
// match the reference.
inline void run_layout(DispatchShape const& shape, int num_ranks, RankTokens const& tokens, NormalRankBuffers& out) {
  int const num_experts = num_ranks * shape.num_local_experts;
  out.num_tokens_per_rank.assign(num_ranks, -1);
  out.num_tokens_per_expert.assign(num_experts, -1);
  out.is_token_in_rank.assign(size_t(tokens.num_tokens) * num_ranks, 2);
  kernels::LayoutArgs args;
  args.topk_idx = tokens.topk_idx.data();
  args.num_tokens = tokens.num_tokens;
  args.num_topk = shape.num_topk;
  args.num_experts = num_experts;
  args.num_ranks = num_ranks;
  args.num_tokens_per_rank = out.num_tokens_per_rank.data();
  args.num_tokens_per_expert = out.num_tokens_per_expert.data();
  args.is_token_in_rank = reinterpret_cast<bool*>(out.is_token_in_rank.data());
  kernels::launch_get_dispatch_layout(args, kernels::default_launch_options("layout", kernel_timeout_cycles()))
      .throw_if_failed();
  for (int t = 0; t < tokens.num_tokens; ++t)
    for (int r = 0; r < num_ranks; ++r)
      CHECK_EQ(int(out.is_token_in_rank[size_t(t) * num_ranks + r]), int(token_goes_to(shape, tokens, t, r)));
}

// A notify that exchanges the layout's counts (and carries a call check with `call_digest`) into this
// rank's prefix matrices and per-expert receive counts.
template <class NotifyArgs>
void set_notify_counts(NotifyArgs& args, NormalRankBuffers& out, RankTokens const& tokens, int num_ranks,
                       int num_channels, int num_local_experts, int expert_alignment, int64_t call_digest) {
  out.recv_rank_prefix.assign(num_ranks + 1, -1);
  out.recv_channel_prefix.assign(size_t(num_ranks) * (num_channels + 1), -1);
  out.num_recv_tokens_per_expert.assign(num_local_experts, -1);
  args.exchange_counts = true;
  args.is_token_in_rank = out.token_in_rank();
  args.num_tokens_per_expert = out.num_tokens_per_expert.data();
  args.num_tokens = tokens.num_tokens;
  args.expert_alignment = expert_alignment;
  args.recv_rank_prefix = out.recv_rank_prefix.data();
  args.recv_channel_prefix_matrix = out.recv_channel_prefix.data();
  args.num_recv_tokens_per_expert = out.num_recv_tokens_per_expert.data();
  args.call_digest = call_digest;
  args.call_flags = 0;
  args.call_agreed = &out.call_agreed;
}

// A dispatch of this rank's tokens into its M received rows (M from notify).
template <class DispatchArgs>
void set_dispatch_rows(DispatchArgs& args, NormalRankBuffers& out, RankTokens const& tokens,
                       DispatchShape const& shape, int num_experts) {
  int const M = out.num_received(), hb = shape.hidden_bytes, sb = shape.scale_bytes, K = shape.num_topk;
  out.recv_x.assign(size_t(M) * hb, 0xee);
  out.recv_x_scales.assign(size_t(M) * sb, 0xee);
  out.recv_topk_idx.assign(size_t(M) * K, -7);
  out.recv_topk_weights.assign(size_t(M) * K, -7.0f);
  out.recv_src_idx.assign(M, -7);
  args.x = tokens.x.data();
  args.hidden_bytes = hb;
  args.x_scales = sb ? tokens.x_scales.data() : nullptr;
  args.scale_bytes = sb;
  args.topk_idx = tokens.topk_idx.data();
  args.topk_weights = tokens.topk_weights.data();
  args.num_topk = K;
  args.num_experts = num_experts;
  args.num_tokens = tokens.num_tokens;
  args.is_token_in_rank = out.token_in_rank();
  args.recv_channel_prefix_matrix = out.recv_channel_prefix.data();
  args.recv_x = out.recv_x.data();
  args.recv_x_scales = sb ? out.recv_x_scales.data() : nullptr;
  args.recv_topk_idx = out.recv_topk_idx.data();
  args.recv_topk_weights = out.recv_topk_weights.data();
  args.recv_src_idx = out.recv_src_idx.data();
}

// What rank `rank` received, bit for bit against the reference, in the reference's row order.
inline void check_received_rows(NormalRankBuffers const& out, ExpectedReceive const& expected, int rank) {
  CHECK(out.recv_src_idx == expected.recv_src_idx);
  CHECK(out.recv_x == expected.recv_x);
  CHECK(out.recv_x_scales == expected.recv_x_scales);
  for (size_t i = 0; i < out.recv_topk_idx.size(); ++i)
    if (out.recv_topk_idx[i] != expected.recv_topk_idx[i])
      throw CheckFailure("recv_topk_idx mismatch: rank " + std::to_string(rank) + " entry " + std::to_string(i) +
                         ": " + std::to_string(out.recv_topk_idx[i]) + " != " +
                         std::to_string(expected.recv_topk_idx[i]));
  CHECK(out.recv_topk_idx == expected.recv_topk_idx);
  CHECK(std::memcmp(out.recv_topk_weights.data(), expected.recv_topk_weights.data(),
                    out.recv_topk_weights.size() * 4) == 0);
}

// Every rank's expert output: one random row (fill_random_expert_row) per received row.
template <class RankOutputs>
void make_expert_outputs(std::vector<RankOutputs>& out, int hidden, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (NormalRankBuffers& o : out) {
    int const M = o.num_received();
    o.expert_out.resize(size_t(M) * hidden);
    for (int m = 0; m < M; ++m) fill_random_expert_row(rng, &o.expert_out[size_t(m) * hidden], hidden);
  }
}

// A combine of this rank's expert outputs back into its tokens' rows. The received weights (topk_weights)
// are left to the caller: the kernel families take an empty input differently.
template <class CombineArgs>
void set_combine_rows(CombineArgs& args, NormalRankBuffers& out, RankTokens const& tokens, int hidden, int num_topk) {
  out.combined_x.assign(size_t(tokens.num_tokens) * hidden, 0xeeee);
  out.combined_topk_weights.assign(size_t(tokens.num_tokens) * num_topk, -7.0f);
  args.x = out.expert_out.data();
  args.hidden = hidden;
  args.num_topk = num_topk;
  args.num_tokens = tokens.num_tokens;
  args.is_token_in_rank = out.token_in_rank();
  args.recv_channel_prefix_matrix = out.recv_channel_prefix.data();
  args.combined_x = out.combined_x.data();
  args.combined_topk_weights = out.combined_topk_weights.data();
}

}  // namespace epcomm::test
