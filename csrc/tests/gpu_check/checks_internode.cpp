// The internode (two-hop) kernels on 2 fake nodes x 4 fake ranks of one device, over ShmTransport: the
// "network" puts are copies into another fake rank's RDMA buffer through a device pointer, which is what
// ShmTransport does over CUDA peer memory. Outputs against the host reference, and the network bytes
// against what the contract says crosses nodes (each token once per destination node).
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "checks.hpp"
#include "fake_cluster.hpp"
#include "intranode_round.hpp"
#include "normal_rank_buffers.hpp"

namespace epcomm::gpu_check {

namespace {

using transport::LinkClass;

struct RankBuffers : NormalRankBuffers {
  DeviceBuffer forward_prefix, forward_peer_masks;  // this rank as forwarder
};

std::string milliseconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f ms", seconds * 1e3);
  return text;
}

Verdict internode_round(Device& device, Scale const& scale, bool fp8) {
  int const NN = scale.internode_nodes, L = scale.internode_nvl_ranks, R = NN * L;
  kernels::InternodeConfig const& config = scale.internode_config;
  int const C = config.nvl.num_channels;
  Problem problem;
  problem.num_ranks = R;
  problem.num_nvl_ranks = L;
  problem.num_tokens = scale.internode_tokens;
  problem.hidden = scale.hidden;
  problem.fp8 = fp8;
  problem.num_topk = scale.num_topk;
  problem.num_experts = scale.num_experts;
  problem.seed = fp8 ? 41 : 40;
  int const N = problem.num_tokens, K = problem.num_topk, hb = problem.hidden_bytes(), sb = problem.scale_bytes();
  int const E = problem.num_experts, local_experts = problem.num_local_experts(), alignment = 1;
  double const timeout_s = scale.kernel_timeout_s, limit_s = host_limit_s(timeout_s);
  test::DispatchShape const shape = problem.dispatch_shape();
  std::vector<test::RankTokens> const tokens = make_tokens(problem);
  auto const goes_to_node = [&](int s, int t, int node) {
    for (int p = 0; p < L; ++p)
      if (test::token_goes_to(shape, tokens[size_t(s)], t, node * L + p)) return true;
    return false;
  };

  // Every fake rank's grid must be resident at once on this one GPU (the abort watcher of each grid waits
  // for all of that grid, and ranks wait on each other)
  int const threads = kernels::internode_block_threads(NN, L);
  int const blocks = kernels::internode_num_blocks(config) * R;
  if (device.is_gpu() && blocks > device.blocks_per_sm(Device::Family::kInternode, threads) * device.num_sms())
    throw CheckFailed(std::to_string(R) + " grids of " + std::to_string(blocks / R) +
                      " blocks do not fit this GPU at once");

  int const dispatch_row = hb + sb;
  InternodeCluster cluster(device, NN, L, config, {L, local_experts, K, std::max(dispatch_row, 2 * problem.hidden)},
                           {NN, L, local_experts, K, dispatch_row, problem.hidden, NN}, timeout_s);
  std::vector<int> const ranks = all_ranks(R);
  std::vector<RankBuffers> buffers(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    test::RankTokens const& mine = tokens[size_t(r)];
    std::vector<uint8_t> in_rank(size_t(N) * size_t(R));
    std::vector<int32_t> per_expert(size_t(E), 0);
    for (int t = 0; t < N; ++t) {
      for (int d = 0; d < R; ++d) in_rank[size_t(t) * size_t(R) + size_t(d)] = test::token_goes_to(shape, mine, t, d);
      for (int k = 0; k < K; ++k)
        if (int64_t const e = mine.topk_idx[size_t(t) * size_t(K) + size_t(k)]; e >= 0) ++per_expert[size_t(e)];
    }
    b.x = upload(device, mine.x);
    b.x_scales = upload(device, mine.x_scales);
    b.topk_idx = upload(device, mine.topk_idx);
    b.topk_weights = upload(device, mine.topk_weights);
    b.is_token_in_rank = upload(device, in_rank);
    b.num_tokens_per_expert = upload(device, per_expert);
    b.recv_rank_prefix = sentinel_filled<int32_t>(device, size_t(R) + 1, -1);
    b.recv_channel_prefix = sentinel_filled<int32_t>(device, size_t(R) * size_t(C + 1), -1);
    b.forward_prefix = sentinel_filled<int32_t>(device, size_t(NN) * size_t(C + 1), -1);
    b.num_recv_per_expert = sentinel_filled<int32_t>(device, size_t(local_experts), -1);
  }
  cluster.take_link_bytes();

  // Notify with counts
  run_step(device, cluster.slots(), "internode_notify", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::InternodeNotifyArgs<Shm> args;
    args.comm = cluster.comm(r);
    set_notify_count_fields(args, b, N, alignment);
    args.forward_channel_prefix_matrix = b.forward_prefix.get<int32_t>();
    device.launch(r, args);
  });
  std::vector<test::ExpectedReceive> expected = expected_receives(problem, tokens, alignment);
  std::vector<int32_t> num_forwarded(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    std::vector<int32_t> const rank_prefix = download<int32_t>(device, b.recv_rank_prefix, size_t(R) + 1);
    expect_equal(device, "internode_notify num_recv_tokens_per_expert", r, b.num_recv_per_expert,
                 expected[size_t(r)].num_recv_tokens_per_expert);
    if (rank_prefix[size_t(R)] != int32_t(expected[size_t(r)].recv_src_idx.size()))
      throw CheckFailed("internode_notify: rank " + std::to_string(r) + " expects " +
                        std::to_string(rank_prefix[size_t(R)]) + " rows, the reference " +
                        std::to_string(expected[size_t(r)].recv_src_idx.size()));
    // Rows rank r forwards: the tokens of rank (m, r % L) that reach node r / L, for every node m
    int32_t forwarded = 0;
    for (int m = 0; m < NN; ++m)
      for (int t = 0; t < N; ++t) forwarded += goes_to_node(m * L + r % L, t, r / L);
    std::vector<int32_t> const forward_prefix = download<int32_t>(device, b.forward_prefix, size_t(NN) * size_t(C + 1));
    if (forward_prefix.back() != forwarded)
      throw CheckFailed("internode_notify: rank " + std::to_string(r) + " forwards " +
                        std::to_string(forward_prefix.back()) + " rows, the reference " + std::to_string(forwarded));
    num_forwarded[size_t(r)] = forwarded;
  }
  uint64_t network_pairs = 0, self_pairs = 0;  // (token, destination node) off / on the source's node
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < N; ++t)
      for (int node = 0; node < NN; ++node)
        if (goes_to_node(s, t, node)) ++(node == s / L ? self_pairs : network_pairs);
  cluster.take_link_bytes();

  // Dispatch
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    poison_receive_outputs(device, b, problem, expected[size_t(r)].recv_src_idx.size());
    // never empty: null means "not given"
    b.forward_peer_masks =
        sentinel_filled<uint32_t>(device, size_t(std::max(num_forwarded[size_t(r)], 1)), 0xeeeeeeeeu);
  }
  double const dispatch_s = run_step(device, cluster.slots(), "internode_dispatch", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::InternodeDispatchArgs<Shm> args;
    args.comm = cluster.comm(r);
    set_shared_dispatch_fields(args, b, problem, N);
    args.max_nodes_per_token = NN;
    args.forward_channel_prefix_matrix = b.forward_prefix.get<int32_t const>();
    args.forward_peer_masks = b.forward_peer_masks.get<uint32_t>();
    device.launch(r, args);
  }).seconds;
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    expect_received(device, "internode_dispatch", r, b, expected[size_t(r)]);
  }
  uint64_t const record = cluster.rdma_workspace().record_bytes;
  std::vector<uint64_t> const dispatch_bytes = cluster.take_link_bytes();
  if (dispatch_bytes[int(LinkClass::kNetwork)] != network_pairs * (record + uint64_t(hb + sb)))
    throw CheckFailed("internode_dispatch put " + std::to_string(dispatch_bytes[int(LinkClass::kNetwork)]) +
                      " bytes across nodes; the contract says " + std::to_string(network_pairs) +
                      " (token, node) pairs x " +
                      std::to_string(record + uint64_t(hb + sb)) + " bytes");

  // Expert outputs, barrier, combine (node partials cross the network in bf16, the rows' dtype)
  std::vector<std::vector<uint16_t>> const expert_out = make_expert_outputs(problem, expected);
  size_t const H = size_t(problem.hidden);
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    b.expert_out = upload(device, expert_out[size_t(r)]);
    b.combined_x = sentinel_filled<uint16_t>(device, size_t(N) * H, 0xeeee);
    b.combined_topk_weights = sentinel_filled<float>(device, size_t(N) * size_t(K), -7.0f);
  }
  run_step(device, cluster.slots(), "internode_notify (barrier)", ranks, limit_s, [&](int r) {
    kernels::InternodeNotifyArgs<Shm> args;
    args.comm = cluster.comm(r);
    device.launch(r, args);
  });
  cluster.take_link_bytes();
  double const combine_s = run_step(device, cluster.slots(), "internode_combine", ranks, limit_s, [&](int r) {
    RankBuffers& b = buffers[size_t(r)];
    kernels::InternodeCombineArgs<Shm> args;
    args.comm = cluster.comm(r);
    args.x = b.expert_out.get<void const>();
    // a rank that received nothing passes null weights, as Python does
    args.topk_weights = expected[size_t(r)].recv_src_idx.empty() ? nullptr : b.recv_topk_weights.get<float const>();
    args.hidden = problem.hidden;
    args.num_topk = K;
    args.num_tokens = N;
    args.is_token_in_rank = b.is_token_in_rank.get<bool const>();
    args.recv_channel_prefix_matrix = b.recv_channel_prefix.get<int32_t const>();
    args.forward_channel_prefix_matrix = b.forward_prefix.get<int32_t const>();
    args.forward_peer_masks = b.forward_peer_masks.get<uint32_t const>();
    args.combined_x = b.combined_x.get();
    args.combined_topk_weights = b.combined_topk_weights.get<float>();
    args.node_partial_kind = kernels::ElementKind::kBfloat16;
    device.launch(r, args);
  }).seconds;
  std::vector<uint64_t> const combine_bytes = cluster.take_link_bytes();
  if (combine_bytes[int(LinkClass::kNetwork)] != network_pairs * cluster.rdma_workspace().combine_put_bytes(2))
    throw CheckFailed("internode_combine put " + std::to_string(combine_bytes[int(LinkClass::kNetwork)]) +
                      " bytes across nodes; the contract says " + std::to_string(network_pairs) +
                      " (token, node) pairs x " +
                      std::to_string(cluster.rdma_workspace().combine_put_bytes(2)) + " bytes");

  // Node partials rounded to bf16 (node_partial_kind above), then summed over nodes in fp32
  std::vector<ExpectedCombine> const want = expected_combines(problem, expected, expert_out, true);
  for (int s = 0; s < R; ++s) {
    expect_equal(device, "internode_combine combined_x", s, buffers[size_t(s)].combined_x, want[size_t(s)].combined_x);
    expect_equal(device, "internode_combine combined_topk_weights", s, buffers[size_t(s)].combined_topk_weights,
                 want[size_t(s)].combined_weights);
  }
  return {Status::kPass, std::to_string(NN) + " nodes x " + std::to_string(L) + ": " + problem.describe() + ", " +
                             std::to_string(C) + " channels: matches the reference, " + std::to_string(network_pairs) +
                             " (token, node) pairs crossed nodes once each (dispatch step " + milliseconds(dispatch_s) +
                             ", combine step " + milliseconds(combine_s) + ")"};
}

}  // namespace

std::vector<Check> internode_checks(Scale const& scale) {
  std::string const shape = std::to_string(scale.internode_nodes) + "x" + std::to_string(scale.internode_nvl_ranks);
  return {
      {"internode_" + shape + "_peer_memory_bf16",
       [scale](Device& device) { return internode_round(device, scale, false); }},
      {"internode_" + shape + "_peer_memory_fp8",
       [scale](Device& device) { return internode_round(device, scale, true); }},
  };
}

}  // namespace epcomm::gpu_check
