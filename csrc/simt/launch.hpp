#pragma once
// Launching kernels on the CPU.
//
//   simt::launch(grid, block, dynamic_smem_bytes, kernel, args...);   // throws LaunchError
//
//   simt::ConcurrentLaunch ranks(options);          // several grids at once, e.g. one per simulated rank
//   ranks.add("rank0", grid, block, smem, kernel, args0...);
//   ranks.add("rank1", grid, block, smem, kernel, args1...);
//   LaunchStatus status = ranks.try_run();          // or ranks.run(), which throws
//
// Every block of every grid of one launch gets its own OS thread and all of
// them run at once (like a cooperative launch), so a block spinning on a flag
// never starves the block, or the rank, that will write it. Arguments are
// copied once and passed by value to every thread, like CUDA kernel
// parameters. Separate launch() calls from separate host threads also run
// concurrently, each with its own watchdog.

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "block.hpp"
#include "control.hpp"
#include "dump.hpp"
#include "errors.hpp"
#include "fuzz.hpp"
#include "watchdog.hpp"

namespace epcomm::simt {

struct LaunchOptions {
  std::string name = "kernel";                       // shown in errors and dumps
  std::optional<std::chrono::milliseconds> timeout;  // unset: EPCOMM_SIMT_TIMEOUT_MS, else 60 s
  std::optional<uint64_t> fuzz_seed;                 // unset: EPCOMM_SIMT_SEED, else no fuzzing; 0: no fuzzing
  size_t stack_bytes = 0;                            // per CUDA thread; 0: default_stack_bytes()
  std::chrono::milliseconds abort_grace{2000};       // how long aborting blocks get to stop
};

inline constexpr uint64_t kMaxThreadsPerBlock = 1024;
inline constexpr uint64_t kMaxBlocksPerLaunch = 4096;  // each block is an OS thread

namespace detail {

struct GridSpec {
  std::string name;
  Dim3 grid_dim, block_dim;
  size_t dynamic_smem_bytes = 0;
  std::function<void()> kernel;  // the kernel with its arguments bound
};

template <class Kernel, class... Args>
std::function<void()> bind_kernel(Kernel kernel, Args... args) {
  return [kernel, arguments = std::make_tuple(std::move(args)...)]() {
    std::apply([&](auto const&... argument) { kernel(argument...); }, arguments);
  };
}

// Everything a running launch touches. Shared with the block threads, so it
// outlives the caller's wait if a block has to be detached.
struct LaunchJob {
  std::vector<GridSpec> grids;
  std::unique_ptr<LaunchControl> control;
  std::vector<std::unique_ptr<Block>> blocks;
};

inline std::string check_grid(GridSpec const& grid) {
  if (grid.grid_dim.volume() == 0 || grid.block_dim.volume() == 0)
    return "grid '" + grid.name + "': grid and block dimensions must be non-zero";
  if (grid.block_dim.volume() > kMaxThreadsPerBlock)
    return "grid '" + grid.name + "': " + std::to_string(grid.block_dim.volume()) +
           " threads per block, at most 1024 supported";
  return "";
}

inline LaunchStatus run_job(std::shared_ptr<LaunchJob> const& job, LaunchOptions const& options) {
  uint64_t total_blocks = 0;
  for (GridSpec const& grid : job->grids) {
    if (std::string problem = check_grid(grid); !problem.empty()) return {ErrorKind::InvalidConfig, problem};
    total_blocks += grid.grid_dim.volume();
  }
  if (total_blocks > kMaxBlocksPerLaunch)
    return {ErrorKind::InvalidConfig, "launch '" + options.name + "': " + std::to_string(total_blocks) +
                                          " blocks, at most " + std::to_string(kMaxBlocksPerLaunch) +
                                          " (one OS thread each) supported"};

  uint64_t const seed = options.fuzz_seed ? *options.fuzz_seed : fuzz_seed_from_env().value_or(0);
  job->control = std::make_unique<LaunchControl>(int(total_blocks));
  for (size_t g = 0; g < job->grids.size(); ++g) {
    GridSpec const& grid = job->grids[g];
    for (uint64_t b = 0; b < grid.grid_dim.volume(); ++b) {
      BlockConfig config;
      config.grid_name = &grid.name;
      config.grid_dim = grid.grid_dim;
      config.block_dim = grid.block_dim;
      config.block_idx = unflatten(b, grid.grid_dim);
      config.dynamic_smem_bytes = grid.dynamic_smem_bytes;
      config.kernel = &grid.kernel;
      config.control = job->control.get();
      config.fuzz_seed = seed;
      config.fuzz_stream = uint64_t(g) << 32 | b;
      config.stack_bytes = options.stack_bytes;
      job->blocks.push_back(std::make_unique<Block>(config));
    }
  }

  std::vector<std::thread> threads;
  // Whatever leaves this function early (an exception from the watchdog or from describing the blocks)
  // must not destroy a joinable std::thread, which calls std::terminate: such threads are detached.
  struct DetachJoinable {
    std::vector<std::thread>& threads;
    ~DetachJoinable() {
      for (std::thread& thread : threads)
        if (thread.joinable()) thread.detach();
    }
  } const detach_on_unwind{threads};
  threads.reserve(job->blocks.size());
  for (size_t i = 0; i < job->blocks.size(); ++i) {
    try {
      Block* block = job->blocks[i].get();
      threads.emplace_back([job, block] {
        block->run();
        job->control->block_finished();
      });
    } catch (std::exception const& e) {
      job->control->fail(ErrorKind::InvalidConfig, "launch '" + options.name + "': cannot start an OS thread for " +
                                                       job->blocks[i]->name() + ": " + e.what());
      for (size_t j = i; j < job->blocks.size(); ++j) job->control->block_not_started();
      break;
    }
  }

  WatchdogResult const watch =
      watch_launch(*job->control, options.name, options.timeout.value_or(default_launch_timeout()), options.abort_grace);
  for (std::thread& thread : threads) {
    if (watch.all_blocks_stopped) thread.join();
    else thread.detach();
  }

  LaunchStatus status = job->control->status();
  if (status.kind == ErrorKind::Timeout || status.kind == ErrorKind::Deadlock) {
    status.message += "\n" + describe_blocks(job->blocks);
  }
  if (!watch.all_blocks_stopped) {
    status.message += "unresponsive blocks (no sync point reached since the abort; a spin loop that does not poll "
                      "through a ptx.cuh helper, an atomic or clock64?); their OS threads were left running:\n";
    for (auto const& block : job->blocks)
      if (!block->finished()) status.message += "  " + block->name() + "\n";
  }
  return status;
}

}  // namespace detail

// Several grids that run at the same time and can wait on each other,
// e.g. one per simulated rank.
class ConcurrentLaunch {
 public:
  explicit ConcurrentLaunch(LaunchOptions options = {}) : options_(std::move(options)) {}

  template <class Kernel, class... Args>
  ConcurrentLaunch& add(std::string grid_name, Dim3 grid_dim, Dim3 block_dim, size_t dynamic_smem_bytes,
                        Kernel kernel, Args... args) {
    grids_.push_back(detail::GridSpec{std::move(grid_name), grid_dim, block_dim, dynamic_smem_bytes,
                                      detail::bind_kernel(kernel, std::move(args)...)});
    return *this;
  }

  // Blocks until every grid finished or the launch failed.
  LaunchStatus try_run() const {
    auto job = std::make_shared<detail::LaunchJob>();
    job->grids = grids_;
    return detail::run_job(job, options_);
  }
  void run() const { try_run().throw_if_failed(); }

 private:
  LaunchOptions options_;
  std::vector<detail::GridSpec> grids_;
};

template <class Kernel, class... Args>
LaunchStatus try_launch(LaunchOptions const& options, Dim3 grid_dim, Dim3 block_dim, size_t dynamic_smem_bytes,
                        Kernel kernel, Args... args) {
  ConcurrentLaunch launch(options);
  launch.add(options.name, grid_dim, block_dim, dynamic_smem_bytes, kernel, std::move(args)...);
  return launch.try_run();
}

template <class Kernel, class... Args>
void launch(LaunchOptions const& options, Dim3 grid_dim, Dim3 block_dim, size_t dynamic_smem_bytes, Kernel kernel,
            Args... args) {
  try_launch(options, grid_dim, block_dim, dynamic_smem_bytes, kernel, std::move(args)...).throw_if_failed();
}

template <class Kernel, class... Args>
void launch(Dim3 grid_dim, Dim3 block_dim, size_t dynamic_smem_bytes, Kernel kernel, Args... args) {
  launch(LaunchOptions{}, grid_dim, block_dim, dynamic_smem_bytes, kernel, std::move(args)...);
}

}  // namespace epcomm::simt
