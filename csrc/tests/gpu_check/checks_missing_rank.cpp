// A fake rank that never launches: the others' kernels must give up by themselves (their clock64 timeout,
// not the host's deadline), and each ErrorSlot that reports a timeout must name the role that waited and
// the missing rank as the peer. Two places a rank can be missing: the notify barrier, and dispatch (after
// a complete notify), where senders and receivers wait on the missing rank's rings.
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "checks.hpp"
#include "fake_cluster.hpp"
#include "intranode_round.hpp"

namespace epcomm::gpu_check {

namespace {

// What the launched ranks' ErrorSlots say, judged: every launched rank reports (a timeout or the abort a
// timeout raised), every timeout names `missing` and one of `roles`, and at least one timeout fired.
std::string judge_slots(ErrorSlots const& slots, std::vector<int> const& launched, int missing,
                        std::set<kernels::Role> const& roles, int* num_timeouts) {
  std::string problems;
  *num_timeouts = 0;
  for (int rank : launched) {
    kernels::ErrorSlot const slot = slots.read(rank);
    std::string const text = slot.code != 0 ? test::error_text(slot) : "nothing";
    if (slot.code == int32_t(kernels::ErrorCode::kTimeout)) {
      ++*num_timeouts;
      if (slot.peer != missing || roles.count(kernels::Role(slot.role)) == 0)
        problems += "  rank " + std::to_string(rank) + " timed out on the wrong peer or role: " + text + "\n";
    } else if (slot.code != int32_t(kernels::ErrorCode::kPeerAborted)) {
      problems += "  rank " + std::to_string(rank) + " reported " + text + "\n";
    }
  }
  if (*num_timeouts == 0) problems += "  no rank reported a timeout\n";
  return problems;
}

std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f s", seconds);
  return text;
}

// The verdict of a step that lacked `missing`: its grids left by themselves before the cuda backend's host
// deadline (2 x timeout + 5 s), with slots as judge_slots wants.
Verdict verdict(StepOutcome const& outcome, ErrorSlots const& slots, std::vector<int> const& launched, int missing,
                std::set<kernels::Role> const& roles, double timeout_s, char const* where) {
  int num_timeouts = 0;
  std::string const problems = judge_slots(slots, launched, missing, roles, &num_timeouts);
  if (!problems.empty())
    throw CheckFailed(std::string("rank ") + std::to_string(missing) + " missing from " + where + ":\n" + problems +
                      "all slots:\n" + slots.report());
  kernels::ErrorSlot const first = [&] {
    for (int rank : launched)
      if (slots.read(rank).code == int32_t(kernels::ErrorCode::kTimeout)) return slots.read(rank);
    return kernels::ErrorSlot{};
  }();
  return {Status::kPass, "rank " + std::to_string(missing) + " of " + std::to_string(launched.size() + 1) +
                             " missing from " + where + ": " + std::to_string(num_timeouts) +
                             " timeout(s), the rest aborted; " +
                             "the grids left after " + seconds_text(outcome.seconds) + " (kernel timeout " +
                             seconds_text(timeout_s) + ", host deadline " + seconds_text(host_limit_s(timeout_s)) +
                             "); e.g. \"" + test::error_text(first) + "\""};
}

Verdict missing_from_notify(Device& device, Scale const& scale) {
  int const R = scale.fake_ranks, missing = R - 3;
  double const timeout_s = scale.missing_rank_timeout_s;
  IntranodeCluster cluster(device, R, {1, 2, 4}, {R, 0, 0, 128}, timeout_s);
  std::vector<int> launched;
  for (int r = 0; r < R; ++r)
    if (r != missing) launched.push_back(r);
  StepOutcome const outcome = run_step(
      device, cluster.slots(), "notify without one rank", launched, host_limit_s(timeout_s),
      [&](int r) {
        kernels::NotifyArgs args;
        args.comm = cluster.comm(r);
        device.launch(r, args);
      },
      /*expect_kernel_errors=*/true);
  return verdict(outcome, cluster.slots(), launched, missing, {kernels::Role::kNotifyBarrier}, timeout_s, "notify");
}

// Every rank notifies (so every rank knows what to expect), then one rank skips dispatch: its peers'
// receivers wait for its rows, and senders whose ring towards it fills wait for it to free slots.
Verdict missing_from_dispatch(Device& device, Scale const& scale) {
  int const R = scale.fake_ranks, missing = R - 3, N = 64, K = 4, hidden = 128;
  double const timeout_s = scale.missing_rank_timeout_s;
  Problem problem;
  problem.num_ranks = problem.num_nvl_ranks = R;
  problem.num_tokens = N;
  problem.hidden = hidden;
  problem.num_topk = K;
  problem.num_experts = 2 * R;
  problem.seed = 5;
  std::vector<test::RankTokens> const tokens = make_tokens(problem);
  kernels::KernelConfig const config{2, 2, 4};  // small rings: senders towards the missing rank fill them
  IntranodeCluster cluster(device, R, config, {R, 2, K, 2 * hidden}, scale.kernel_timeout_s);
  struct RankBuffers {
    DeviceBuffer x, topk_idx, in_rank, rank_prefix, channel_prefix, recv_x, recv_src_idx;
  };
  std::vector<RankBuffers> buffers(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    RankBuffers& b = buffers[size_t(r)];
    std::vector<uint8_t> in_rank(size_t(N) * size_t(R));
    for (int t = 0; t < N; ++t)
      for (int d = 0; d < R; ++d)
        in_rank[size_t(t) * size_t(R) + size_t(d)] =
            test::token_goes_to(problem.dispatch_shape(), tokens[size_t(r)], t, d);
    b.x = upload(device, tokens[size_t(r)].x);
    b.topk_idx = upload(device, tokens[size_t(r)].topk_idx);
    b.in_rank = upload(device, in_rank);
    b.rank_prefix = DeviceBuffer(device, sizeof(int32_t) * size_t(R + 1));
    b.channel_prefix = DeviceBuffer(device, sizeof(int32_t) * size_t(R) * size_t(config.num_channels + 1));
    b.recv_x = DeviceBuffer(device, size_t(N) * size_t(R) * size_t(2 * hidden));  // room for every row
    b.recv_src_idx = DeviceBuffer(device, sizeof(int32_t) * size_t(N) * size_t(R));
  }
  run_step(device, cluster.slots(), "notify", all_ranks(R), host_limit_s(scale.kernel_timeout_s), [&](int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    args.exchange_counts = true;
    args.is_token_in_rank = buffers[size_t(r)].in_rank.get<bool const>();
    args.num_tokens = N;
    args.recv_rank_prefix = buffers[size_t(r)].rank_prefix.get<int32_t>();
    args.recv_channel_prefix_matrix = buffers[size_t(r)].channel_prefix.get<int32_t>();
    device.launch(r, args);
  });
  cluster.set_timeout(timeout_s);
  std::vector<int> launched;
  for (int r = 0; r < R; ++r)
    if (r != missing) launched.push_back(r);
  StepOutcome const outcome = run_step(
      device, cluster.slots(), "intranode_dispatch without one rank", launched, host_limit_s(timeout_s),
      [&](int r) {
        RankBuffers& b = buffers[size_t(r)];
        kernels::IntranodeDispatchArgs args;
        args.comm = cluster.comm(r);
        args.x = b.x.get<void const>();
        args.hidden_bytes = 2 * hidden;
        args.topk_idx = b.topk_idx.get<int64_t const>();
        args.num_topk = K;
        args.num_experts = problem.num_experts;
        args.num_tokens = N;
        args.is_token_in_rank = b.in_rank.get<bool const>();
        args.recv_channel_prefix_matrix = b.channel_prefix.get<int32_t const>();
        args.recv_x = b.recv_x.get();
        args.recv_src_idx = b.recv_src_idx.get<int32_t>();
        device.launch(r, args);
      },
      /*expect_kernel_errors=*/true);
  return verdict(outcome, cluster.slots(), launched, missing,
                 {kernels::Role::kDispatchSender, kernels::Role::kDispatchReceiver}, timeout_s, "dispatch");
}

}  // namespace

std::vector<Check> missing_rank_checks(Scale const& scale) {
  return {
      {"missing_rank_notify_times_out_naming_it",
       [scale](Device& device) { return missing_from_notify(device, scale); }},
      {"missing_rank_dispatch_times_out_naming_it",
       [scale](Device& device) { return missing_from_dispatch(device, scale); }},
  };
}

}  // namespace epcomm::gpu_check
