// Intranode checks: the production sizes (R fake ranks, 10 channels, hidden 7168, top-8) at 0, 1, 33 and
// 4096 tokens, bf16 and FP8; and a grid far larger than the SM count.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "checks.hpp"
#include "fake_cluster.hpp"
#include "intranode_round.hpp"

namespace epcomm::gpu_check {

namespace {

std::string milliseconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f ms", seconds * 1e3);
  return text;
}

Verdict production_sizes(Device& device, Scale const& scale, int num_tokens, bool fp8) {
  Problem problem;
  problem.num_ranks = problem.num_nvl_ranks = scale.fake_ranks;
  problem.num_tokens = num_tokens;
  problem.hidden = scale.hidden;
  problem.fp8 = fp8;
  problem.num_topk = scale.num_topk;
  problem.num_experts = scale.num_experts;
  problem.seed = uint64_t(num_tokens) * 2 + (fp8 ? 1 : 0) + 1;
  RoundTimes const times = run_intranode_round(device, problem, scale.intranode_config, scale.kernel_timeout_s);
  return {Status::kPass, problem.describe() + ", " + std::to_string(scale.intranode_config.num_channels) +
                             " channels: matches the reference (dispatch step " + milliseconds(times.dispatch_s) +
                             ", combine step " + milliseconds(times.combine_s) + ")"};
}

// A grid many times the SM count: several blocks of the same channel kernel per SM, spinning next to the
// blocks they wait for, and channels that only start when earlier ones have left their SMs' slots. On one
// GPU the fake ranks' grids must still all fit at once: a resident grid waiting on a peer's grid queued
// behind it on the same device would wait forever, which says nothing about R GPUs (there every rank's
// grid is dispatched in channel order on its own device). So the channel count is the largest for which
// the occupancy API holds every fake rank's grid, at most the kernels' 512.
Verdict grid_far_larger_than_sms(Device& device, Scale const& scale) {
  int const R = scale.oversubscribed_ranks, threads = kernels::comm_block_threads(R);
  int channels = scale.dry_run_oversubscribed_channels, blocks_per_sm = 0;
  if (device.is_gpu()) {
    blocks_per_sm = device.blocks_per_sm(Device::Family::kIntranode, threads);
    channels = std::min(kernels::kMaxChannels,
                        blocks_per_sm * device.num_sms() / (kernels::kIntranodeBlocksPerChannel * R));
    int const grid_blocks = kernels::kIntranodeBlocksPerChannel * channels;
    if (grid_blocks < 4 * device.num_sms())
      throw CheckFailed("only " + std::to_string(blocks_per_sm) + " blocks of " + std::to_string(threads) +
                        " threads fit an SM: a grid of " + std::to_string(grid_blocks) +
                        " blocks is not far larger than " + std::to_string(device.num_sms()) + " SMs");
  }
  Problem problem;
  problem.num_ranks = problem.num_nvl_ranks = R;
  problem.num_tokens = scale.oversubscribed_tokens_per_channel * channels;
  problem.hidden = scale.oversubscribed_hidden;
  problem.num_topk = scale.num_topk;
  problem.num_experts = 64;
  problem.seed = 77;
  // Small rings: senders wait for their receivers many times per channel
  kernels::KernelConfig const config{channels, 2, 4};
  RoundTimes const times = run_intranode_round(device, problem, config, scale.kernel_timeout_s);
  int const grid_blocks = kernels::kIntranodeBlocksPerChannel * channels;
  std::string detail = std::to_string(R) + " ranks x " + std::to_string(grid_blocks) + " blocks of " +
                       std::to_string(threads) + " threads";
  if (device.is_gpu()) {
    char ratio[32];
    std::snprintf(ratio, sizeof(ratio), "%.1f", double(grid_blocks) / device.num_sms());
    detail += " on " + std::to_string(device.num_sms()) + " SMs (" + ratio + "x the SM count per grid; " +
              std::to_string(blocks_per_sm) + " blocks fit an SM)";
  } else {
    detail += " (SIMT: a block per OS thread, no SM count)";
  }
  return {Status::kPass, detail + ", " + std::to_string(problem.num_tokens) +
                             " tokens per rank: matches the reference (dispatch step " +
                             milliseconds(times.dispatch_s) + ", combine step " + milliseconds(times.combine_s) + ")"};
}

}  // namespace

std::vector<Check> intranode_checks(Scale const& scale) {
  std::vector<Check> checks;
  for (bool fp8 : {false, true})
    for (int num_tokens : scale.token_counts)
      checks.push_back({"intranode_" + std::to_string(num_tokens) + "_tokens_" + (fp8 ? "fp8" : "bf16"),
                        [scale, num_tokens, fp8](Device& device) {
                          return production_sizes(device, scale, num_tokens, fp8);
                        }});
  checks.push_back({"intranode_grid_far_larger_than_sms",
                    [scale](Device& device) { return grid_far_larger_than_sms(device, scale); }});
  return checks;
}

}  // namespace epcomm::gpu_check
