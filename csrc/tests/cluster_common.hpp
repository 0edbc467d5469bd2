#pragma once
// The scaffolding of a kernel test that runs every rank of a job in this process: each rank's grid is
// one grid of a simt::ConcurrentLaunch (every block on its own OS thread, so ranks that wait on each
// other make progress), each rank's buffers are zeroed allocations the other ranks reach through plain
// pointers, and each rank's kernels report into its own ErrorSlot. A test's Cluster derives from
// InProcessRanks and adds its kernel family's workspaces and peer tables.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/error.cuh"
#include "../kernels/intranode.hpp"
#include "../transport/transport.cuh"
#include "harness.hpp"
#include "test_common.hpp"

namespace epcomm::test {

class InProcessRanks {
 public:
  // `family` names the kernels in failure messages ("<family> launch failed: ...").
  InProcessRanks(std::string family, int num_ranks, std::optional<uint64_t> schedule_seed)
      : errors(size_t(num_ranks), kernels::ErrorSlot{}), fuzz_seed(schedule_seed), family_(std::move(family)) {}

  int num_ranks() const { return int(errors.size()); }

  // A zeroed, 128-byte aligned buffer that lives as long as the cluster.
  char* allocate(size_t bytes) {
    buffers_.push_back(std::make_unique<AlignedBuffer>(bytes));
    return static_cast<char*>(buffers_.back()->ptr);
  }

  // A comm part of any kernel family's Args, with the fields every family shares set for `rank`; the
  // test's Cluster fills in its workspaces and peer tables.
  template <class Comm>
  Comm comm_for(int rank) {
    Comm comm;
    comm.rank = rank;
    comm.num_ranks = num_ranks();
    comm.error = &errors[size_t(rank)];
    comm.timeout_cycles = kernel_timeout_cycles();
    return comm;
  }

  // Launch options of the tests' kernel timeout, with this cluster's schedule-fuzz seed.
  simt::LaunchOptions options(char const* name) const {
    simt::LaunchOptions launch_options = kernels::default_launch_options(name, kernel_timeout_cycles());
    launch_options.fuzz_seed = fuzz_seed;
    return launch_options;
  }

  // Runs the launch until every grid has returned; a failed launch or a filled error slot fails the
  // test with every rank's error (one rank's failure aborts its peers: together they say who failed first).
  void run(simt::ConcurrentLaunch const& launch) const {
    simt::LaunchStatus status = launch.try_run();
    std::string problems;
    for (kernels::ErrorSlot const& slot : errors)
      if (slot.code != 0) problems += "  kernel error: " + error_text(slot) + "\n";
    if (!status.ok()) problems += std::string("  launch failed: ") + status.message + "\n";
    if (!problems.empty()) throw CheckFailure(family_ + " launch failed:\n" + problems);
  }

  // One launch holding the grids `add_rank_grids(launch, rank)` adds for every rank, run as run() does.
  template <class AddRankGrids>
  void run_on_every_rank(char const* name, AddRankGrids&& add_rank_grids) const {
    simt::ConcurrentLaunch launch(options(name));
    for (int rank = 0; rank < num_ranks(); ++rank) add_rank_grids(launch, rank);
    run(launch);
  }

  // Launches `add_grid(launch, args)` for rank args.comm.rank alone, with a short kernel timeout (50 ms):
  // the ranks it waits for never launch, so its kernel must leave by itself (the launch succeeds) with a
  // timeout in its error slot. Returns that slot's text, which must name whom it waited for.
  template <class Args, class AddGrid>
  std::string run_alone_until_timeout(char const* name, Args args, AddGrid add_grid) const {
    args.comm.timeout_cycles = 50'000'000;  // 50 ms
    simt::ConcurrentLaunch launch(options(name));
    add_grid(launch, args);
    CHECK(launch.try_run().ok());  // the kernel left by itself
    kernels::ErrorSlot const& slot = errors[size_t(args.comm.rank)];
    CHECK_EQ(slot.code, int32_t(kernels::ErrorCode::kTimeout));
    return error_text(slot);
  }

  std::vector<kernels::ErrorSlot> errors;  // [rank], zeroed; tests that expect a kernel error read it
  std::optional<uint64_t> fuzz_seed;       // of every launch; none: the OS's own schedule

 private:
  std::string family_;
  std::vector<std::unique_ptr<AlignedBuffer>> buffers_;
};

// The counters ShmTransport fills (transport/shm_transport.cuh): [rank][link class], the bytes each rank
// put (or, as its put counters, the puts it made), so that a test can prove what crossed which link.
class LinkByteCounters {
 public:
  explicit LinkByteCounters(int num_ranks) : bytes_(size_t(num_ranks) * transport::kNumLinkClasses, 0) {}

  // The counters of `rank`: what its ShmTransport takes.
  uint64_t* of_rank(int rank) { return &bytes_[size_t(rank) * transport::kNumLinkClasses]; }

  // Bytes all ranks put since the last take, per link class (indexed by transport::LinkClass).
  std::vector<uint64_t> take_per_link_class() {
    std::vector<uint64_t> totals(transport::kNumLinkClasses, 0);
    for (size_t i = 0; i < bytes_.size(); ++i) totals[i % transport::kNumLinkClasses] += std::exchange(bytes_[i], 0);
    return totals;
  }

  // Bytes all ranks put since the last take, over every link class.
  uint64_t take_total() {
    uint64_t total = 0;
    for (uint64_t& bytes : bytes_) total += std::exchange(bytes, 0);
    return total;
  }

 private:
  std::vector<uint64_t> bytes_;
};

}  // namespace epcomm::test
