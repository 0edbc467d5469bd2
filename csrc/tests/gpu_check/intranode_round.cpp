// One intranode round on fake ranks (intranode_round.hpp).
#include "intranode_round.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "fake_cluster.hpp"
#include "normal_rank_buffers.hpp"

namespace epcomm::gpu_check {

namespace {

constexpr int kExpertAlignment = 4;  // per-expert receive counts come back rounded up to this

// One rank's inputs and outputs on the device.
struct RankBuffers : NormalRankBuffers {
  DeviceBuffer num_tokens_per_rank, call_agreed;  // the layout kernel's, notify's call check
};

void fail_if(std::string const& difference) {
  if (!difference.empty()) throw CheckFailed(difference);
}

// The layout kernel's outputs against their definition.
void check_layout(Problem const& problem, test::RankTokens const& tokens, int rank,
                  std::vector<int32_t> const& per_rank, std::vector<int32_t> const& per_expert,
                  std::vector<uint8_t> const& in_rank) {
  test::DispatchShape const shape = problem.dispatch_shape();
  std::vector<int32_t> want_rank(size_t(problem.num_ranks), 0), want_expert(size_t(problem.num_experts), 0);
  std::vector<uint8_t> want_in_rank(size_t(tokens.num_tokens) * size_t(problem.num_ranks), 0);
  for (int t = 0; t < tokens.num_tokens; ++t) {
    for (int k = 0; k < problem.num_topk; ++k)
      if (int64_t const e = tokens.topk_idx[size_t(t) * size_t(problem.num_topk) + size_t(k)]; e >= 0)
        ++want_expert[size_t(e)];
    for (int r = 0; r < problem.num_ranks; ++r)
      if (test::token_goes_to(shape, tokens, t, r)) {
        want_in_rank[size_t(t) * size_t(problem.num_ranks) + size_t(r)] = 1;
        ++want_rank[size_t(r)];
      }
  }
  fail_if(first_difference("layout num_tokens_per_rank", rank, per_rank, want_rank));
  fail_if(first_difference("layout num_tokens_per_expert", rank, per_expert, want_expert));
  fail_if(first_difference("layout is_token_in_rank", rank, in_rank, want_in_rank));
}

// Notify's prefixes against the expected receive order: rows of source s, channel c start at the
// rows of every earlier (source, channel); a channel is the source's tokens [N c / C, N (c + 1) / C).
void check_prefixes(Problem const& problem, std::vector<test::RankTokens> const& tokens, int rank, int num_channels,
                    std::vector<int32_t> const& rank_prefix, std::vector<int32_t> const& channel_prefix) {
  test::DispatchShape const shape = problem.dispatch_shape();
  std::vector<int32_t> want_rank(size_t(problem.num_ranks) + 1, 0), want_channel;
  int32_t row = 0;
  for (int s = 0; s < problem.num_ranks; ++s) {
    want_rank[size_t(s)] = row;
    int const N = tokens[size_t(s)].num_tokens;
    for (int c = 0; c <= num_channels; ++c) {
      want_channel.push_back(row);
      if (c == num_channels) break;
      int const begin = int(int64_t(N) * c / num_channels), end = int(int64_t(N) * (c + 1) / num_channels);
      for (int t = begin; t < end; ++t) row += test::token_goes_to(shape, tokens[size_t(s)], t, rank);
    }
  }
  want_rank[size_t(problem.num_ranks)] = row;
  fail_if(first_difference("notify recv_rank_prefix", rank, rank_prefix, want_rank));
  fail_if(first_difference("notify recv_channel_prefix_matrix", rank, channel_prefix, want_channel));
}

}  // namespace

RoundTimes run_intranode_round(Device& device, Problem const& problem, kernels::KernelConfig const& config,
                               double timeout_s) {
  int const R = problem.num_ranks, K = problem.num_topk, C = config.num_channels, N = problem.num_tokens;
  int const hb = problem.hidden_bytes(), sb = problem.scale_bytes(), L = problem.num_local_experts();
  double const limit_s = host_limit_s(timeout_s);
  // Every fake rank's grid must be resident at once on this one GPU (a resident grid waiting for a peer's
  // grid queued behind it would wait forever: the emulation's limit, not the kernels')
  int const threads = kernels::comm_block_threads(R), blocks = R * kernels::comm_num_blocks(config);
  if (device.is_gpu() && blocks > device.blocks_per_sm(Device::Family::kIntranode, threads) * device.num_sms())
    throw CheckFailed(std::to_string(R) + " fake ranks' grids (" + std::to_string(blocks) + " blocks of " +
                      std::to_string(threads) + " threads) do not fit this GPU at once: use fewer channels");
  std::vector<test::RankTokens> const tokens = make_tokens(problem);
  IntranodeCluster cluster(device, R, config, {R, L, K, std::max(hb + sb, 2 * problem.hidden)}, timeout_s);
  std::vector<int> const ranks = all_ranks(R);
  std::vector<RankBuffers> buffers(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    test::RankTokens const& mine = tokens[size_t(r)];
    b.x = upload(device, mine.x);
    b.x_scales = upload(device, mine.x_scales);
    b.topk_idx = upload(device, mine.topk_idx);
    b.topk_weights = upload(device, mine.topk_weights);
    b.num_tokens_per_rank = sentinel_filled<int32_t>(device, size_t(R), -1);
    b.num_tokens_per_expert = sentinel_filled<int32_t>(device, size_t(problem.num_experts), -1);
    b.is_token_in_rank = sentinel_filled<uint8_t>(device, size_t(N) * size_t(R), 2);
    b.recv_rank_prefix = sentinel_filled<int32_t>(device, size_t(R) + 1, -1);
    b.recv_channel_prefix = sentinel_filled<int32_t>(device, size_t(R) * size_t(C + 1), -1);
    b.num_recv_per_expert = sentinel_filled<int32_t>(device, size_t(L), -1);
    b.call_agreed = sentinel_filled<int32_t>(device, 1, -1);
  }

  // Layout
  run_step(device, cluster.slots(), "get_dispatch_layout", ranks, limit_s, [&](int r) {
    kernels::LayoutArgs args;
    args.topk_idx = buffers[size_t(r)].topk_idx.get<int64_t const>();
    args.num_tokens = N;
    args.num_topk = K;
    args.num_experts = problem.num_experts;
    args.num_ranks = R;
    args.num_tokens_per_rank = buffers[size_t(r)].num_tokens_per_rank.get<int32_t>();
    args.num_tokens_per_expert = buffers[size_t(r)].num_tokens_per_expert.get<int32_t>();
    args.is_token_in_rank = buffers[size_t(r)].is_token_in_rank.get<bool>();
    device.launch(r, args);
  });
  for (int r = 0; r < R; ++r)
    check_layout(problem, tokens[size_t(r)], r,
                 download<int32_t>(device, buffers[size_t(r)].num_tokens_per_rank, size_t(R)),
                 download<int32_t>(device, buffers[size_t(r)].num_tokens_per_expert, size_t(problem.num_experts)),
                 download<uint8_t>(device, buffers[size_t(r)].is_token_in_rank, size_t(N) * size_t(R)));

  // Notify: counts, barrier, prefixes, and the call check every production call starts with
  run_step(device, cluster.slots(), "notify", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    set_notify_count_fields(args, b, N, kExpertAlignment);
    args.call_digest = int64_t(problem.seed);
    args.call_flags = 0;
    args.call_agreed = b.call_agreed.get<int32_t>();
    device.launch(r, args);
  });
  std::vector<test::ExpectedReceive> expected = expected_receives(problem, tokens, kExpertAlignment);
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    check_prefixes(problem, tokens, r, C, download<int32_t>(device, b.recv_rank_prefix, size_t(R) + 1),
                   download<int32_t>(device, b.recv_channel_prefix, size_t(R) * size_t(C + 1)));
    expect_equal(device, "notify num_recv_tokens_per_expert", r, b.num_recv_per_expert,
                 expected[size_t(r)].num_recv_tokens_per_expert);
    expect_equal(device, "notify call_agreed", r, b.call_agreed, std::vector<int32_t>{1});
  }

  // Dispatch
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    poison_receive_outputs(device, b, problem, expected[size_t(r)].recv_src_idx.size());
  }
  RoundTimes times;
  times.dispatch_s = run_step(device, cluster.slots(), "intranode_dispatch", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::IntranodeDispatchArgs args;
    args.comm = cluster.comm(r);
    set_shared_dispatch_fields(args, b, problem, N);
    device.launch(r, args);
  }).seconds;
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    expect_received(device, "dispatch", r, b, expected[size_t(r)]);  // frees the reference rows for combine
  }

  // Expert outputs: random bf16 rows whose sum depends on the order (test_common.hpp)
  std::vector<std::vector<uint16_t>> const expert_out = make_expert_outputs(problem, expected);
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    b.expert_out = upload(device, expert_out[size_t(r)]);
    b.combined_x = sentinel_filled<uint16_t>(device, size_t(N) * size_t(problem.hidden), 0xeeee);
    b.combined_topk_weights = sentinel_filled<float>(device, size_t(N) * size_t(K), -7.0f);
  }

  // Barrier (resets the rings), then combine
  run_step(device, cluster.slots(), "notify (barrier)", ranks, limit_s, [&](int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    device.launch(r, args);
  });
  times.combine_s = run_step(device, cluster.slots(), "intranode_combine", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::IntranodeCombineArgs args;
    args.comm = cluster.comm(r);
    args.x = b.expert_out.get<void const>();
    args.topk_weights = b.recv_topk_weights.get<float const>();
    args.hidden = problem.hidden;
    args.num_topk = K;
    args.num_tokens = N;
    args.is_token_in_rank = b.is_token_in_rank.get<bool const>();
    args.recv_channel_prefix_matrix = b.recv_channel_prefix.get<int32_t const>();
    args.combined_x = b.combined_x.get();
    args.combined_topk_weights = b.combined_topk_weights.get<float>();
    device.launch(r, args);
  }).seconds;

  // One node: a single fp32 partial per token, rounded once
  std::vector<ExpectedCombine> const want = expected_combines(problem, expected, expert_out, false);
  for (int s = 0; s < R; ++s) {
    expect_equal(device, "combine combined_x", s, buffers[size_t(s)].combined_x, want[size_t(s)].combined_x);
    expect_equal(device, "combine combined_topk_weights", s, buffers[size_t(s)].combined_topk_weights,
                 want[size_t(s)].combined_weights);
  }
  return times;
}

}  // namespace epcomm::gpu_check
