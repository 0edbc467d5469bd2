#pragma once
// One fake rank's device buffers in a normal-mode round, and what the intranode and internode rounds
// do alike with them: fill the receive outputs with values no correct dispatch writes, set the
// dispatch fields both kernel families share, compare the received rows with the reference.

#include <cstdint>
#include <string>
#include <vector>

#include "../dispatch_reference.hpp"
#include "device_data.hpp"
#include "problem.hpp"

namespace epcomm::gpu_check {

struct NormalRankBuffers {
  DeviceBuffer x, x_scales, topk_idx, topk_weights;                                      // inputs
  DeviceBuffer num_tokens_per_expert, is_token_in_rank;                                  // layout
  DeviceBuffer recv_rank_prefix, recv_channel_prefix, num_recv_per_expert;               // notify
  DeviceBuffer recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx;    // dispatch
  DeviceBuffer expert_out, combined_x, combined_topk_weights;                            // combine
};

// Receive outputs for `num_rows` rows, poisoned: a row the kernel forgot shows as a mismatch.
inline void poison_receive_outputs(Device& device, NormalRankBuffers& b, Problem const& problem, size_t num_rows) {
  size_t const K = size_t(problem.num_topk);
  b.recv_x = sentinel_filled<uint8_t>(device, num_rows * size_t(problem.hidden_bytes()), 0xee);
  b.recv_x_scales = sentinel_filled<uint8_t>(device, num_rows * size_t(problem.scale_bytes()), 0xee);
  b.recv_topk_idx = sentinel_filled<int64_t>(device, num_rows * K, -7);
  b.recv_topk_weights = sentinel_filled<float>(device, num_rows * K, -7.0f);
  b.recv_src_idx = sentinel_filled<int32_t>(device, num_rows, -7);
}

// The count-exchange fields of a notify (both kernel families: EPCOMM_NOTIFY_FIELDS) from rank buffers `b`.
template <class Args>
void set_notify_count_fields(Args& args, NormalRankBuffers& b, int num_tokens, int expert_alignment) {
  args.exchange_counts = true;
  args.is_token_in_rank = b.is_token_in_rank.get<bool const>();
  args.num_tokens_per_expert = b.num_tokens_per_expert.get<int32_t const>();
  args.num_tokens = num_tokens;
  args.expert_alignment = expert_alignment;
  args.recv_rank_prefix = b.recv_rank_prefix.get<int32_t>();
  args.recv_channel_prefix_matrix = b.recv_channel_prefix.get<int32_t>();
  args.num_recv_tokens_per_expert = b.num_recv_per_expert.get<int32_t>();
}

// The dispatch fields of `args` that intranode and internode dispatch share (kernels/intranode.hpp
// EPCOMM_DISPATCH_FIELDS), from rank buffers `b` with `num_tokens` tokens.
template <class Args>
void set_shared_dispatch_fields(Args& args, NormalRankBuffers& b, Problem const& problem, int num_tokens) {
  int const sb = problem.scale_bytes();
  args.x = b.x.get<void const>();
  args.hidden_bytes = problem.hidden_bytes();
  args.x_scales = sb > 0 ? b.x_scales.get<void const>() : nullptr;
  args.scale_bytes = sb;
  args.topk_idx = b.topk_idx.get<int64_t const>();
  args.topk_weights = b.topk_weights.get<float const>();
  args.num_topk = problem.num_topk;
  args.num_experts = problem.num_experts;
  args.num_tokens = num_tokens;
  args.is_token_in_rank = b.is_token_in_rank.get<bool const>();
  args.recv_channel_prefix_matrix = b.recv_channel_prefix.get<int32_t const>();
  args.recv_x = b.recv_x.get();
  args.recv_x_scales = sb > 0 ? b.recv_x_scales.get() : nullptr;
  args.recv_topk_idx = b.recv_topk_idx.get<int64_t>();
  args.recv_topk_weights = b.recv_topk_weights.get<float>();
  args.recv_src_idx = b.recv_src_idx.get<int32_t>();
}

// Every received output of `kernel` on `rank` against the reference; then frees the reference rows
// (the check holds every rank's at once, and combine needs room for its own).
inline void expect_received(Device& device, std::string const& kernel, int rank, NormalRankBuffers const& b,
                            test::ExpectedReceive& want) {
  expect_equal(device, (kernel + " recv_src_idx").c_str(), rank, b.recv_src_idx, want.recv_src_idx);
  expect_equal(device, (kernel + " recv_x").c_str(), rank, b.recv_x, want.recv_x);
  expect_equal(device, (kernel + " recv_x_scales").c_str(), rank, b.recv_x_scales, want.recv_x_scales);
  expect_equal(device, (kernel + " recv_topk_idx").c_str(), rank, b.recv_topk_idx, want.recv_topk_idx);
  expect_equal(device, (kernel + " recv_topk_weights").c_str(), rank, b.recv_topk_weights, want.recv_topk_weights);
  std::vector<uint8_t>().swap(want.recv_x);
  std::vector<uint8_t>().swap(want.recv_x_scales);
}

}  // namespace epcomm::gpu_check
