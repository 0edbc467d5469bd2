#pragma once
// The checks of `make gpu-check`, written once for both targets (device.hpp), and the sizes they run at:
// the real ones on a GPU, shrunk ones for the dry run (--dry-run), which runs the same scenario and
// verdict code on the SIMT target in CI so that the harness cannot rot before a GPU ever runs it.

#include <functional>
#include <string>
#include <vector>

#include "../../kernels/internode.hpp"
#include "../../kernels/intranode.hpp"
#include "device.hpp"

namespace epcomm::gpu_check {

struct Scale {
  bool dry_run = false;
  // Intranode: R fake ranks, C channels, DeepSeek-V3-shaped rows (hidden 7168, top-8 of 256 experts)
  int fake_ranks = 8;
  int hidden = 7168;
  int num_topk = 8, num_experts = 256;
  std::vector<int> token_counts = {0, 1, 33, 4096};  // per rank
  kernels::KernelConfig intranode_config{10, 6, 256};  // channels, NVL chunk, NVL ring (DeepEP's 8-rank sizes)
  double kernel_timeout_s = 20;                        // of the runs that must succeed
  // The grid far larger than the SM count: 2 ranks, as many channels as all their grids can hold at once
  int oversubscribed_ranks = 2, oversubscribed_hidden = 1024, oversubscribed_tokens_per_channel = 8;
  int dry_run_oversubscribed_channels = 512;  // the SIMT target has no SM count to size it from: the maximum
  // A rank that never launches
  double missing_rank_timeout_s = 1.0;
  // The call timed next to a long kernel (one rank through the device runtime)
  int stall_tokens = 128;
  double long_kernel_max_s = 2.0;
  // Internode over ShmTransport (device peer pointers standing in for the network): 2 nodes x 4
  int internode_nodes = 2, internode_nvl_ranks = 4, internode_tokens = 1024;
  kernels::InternodeConfig internode_config{{10, 6, 128}, 16, 128};  // NVL side; network chunk, network ring
  // Low-latency kernels over ShmTransport on device memory: R fake ranks, DeepEP's decode shape
  int ll_ranks = 8, ll_max_tokens = 128;
};

Scale gpu_scale();
Scale dry_run_scale();

enum class Status { kPass, kFail, kSkip };

struct Verdict {
  Status status = Status::kPass;
  std::string detail;
};

struct Check {
  std::string name;
  std::function<Verdict(Device&)> run;  // throws CheckFailed (or anything) to fail
};

// The checks of each scenario file, named for what they prove.
std::vector<Check> intranode_checks(Scale const& scale);       // checks_intranode.cpp
std::vector<Check> missing_rank_checks(Scale const& scale);    // checks_missing_rank.cpp
std::vector<Check> long_kernel_checks(Scale const& scale);     // checks_long_kernel.cpp
std::vector<Check> internode_checks(Scale const& scale);       // checks_internode.cpp
std::vector<Check> low_latency_checks(Scale const& scale);     // checks_low_latency.cpp

}  // namespace epcomm::gpu_check
