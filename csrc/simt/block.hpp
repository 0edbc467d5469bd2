#pragma once
// Block: one CUDA block, run on its own OS thread, its CUDA threads as fibers.

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "barrier.hpp"
#include "control.hpp"
#include "dim3.hpp"
#include "fiber.hpp"
#include "scheduler.hpp"
#include "thread_state.hpp"
#include "warp.hpp"

namespace epcomm::simt {

struct BlockConfig {
  std::string const* grid_name = nullptr;  // owned by the launch
  Dim3 grid_dim, block_dim, block_idx;
  size_t dynamic_smem_bytes = 0;
  std::function<void()> const* kernel = nullptr;  // the kernel with its arguments bound; owned by the launch
  LaunchControl* control = nullptr;
  uint64_t fuzz_seed = 0;    // 0: no fuzzing
  uint64_t fuzz_stream = 0;  // distinguishes the blocks of one launch
  size_t stack_bytes = 0;
};

class Block {
 public:
  // Poison for dynamic shared memory: on a GPU it starts as garbage, and
  // zeros would hide a read-before-write.
  static constexpr unsigned char kSharedMemoryPoison = 0xCD;
  static constexpr size_t kSharedMemoryAlignment = 1024;

  explicit Block(BlockConfig const& config) : config_(config) {
    num_threads_ = uint32_t(config.block_dim.volume());
    threads_ = std::make_unique<SimtThread[]>(num_threads_);
    for (uint32_t i = 0; i < num_threads_; ++i) {
      threads_[i].thread_idx = unflatten(i, config.block_dim);
      threads_[i].linear_idx = i;
      threads_[i].warp_idx = i / kWarpSize;
      threads_[i].lane_idx = i % kWarpSize;
    }
    num_warps_ = (num_threads_ + kWarpSize - 1) / kWarpSize;
    warps_ = std::make_unique<WarpCollectives[]>(num_warps_);
    for (uint32_t w = 0; w < num_warps_; ++w)
      warps_[w].init(&scheduler_, &threads_[w * kWarpSize], std::min(kWarpSize, num_threads_ - w * kWarpSize));
    barriers_.init(&scheduler_, num_threads_);
    scheduler_.init(threads_.get(), num_threads_, config.control, config.fuzz_seed, config.fuzz_stream,
                    &Block::report_deadlock, this);
    if (config.dynamic_smem_bytes) {
      size_t bytes = (config.dynamic_smem_bytes + kSharedMemoryAlignment - 1) / kSharedMemoryAlignment *
                     kSharedMemoryAlignment;
      dynamic_smem_.reset(static_cast<unsigned char*>(std::aligned_alloc(kSharedMemoryAlignment, bytes)));
      std::memset(dynamic_smem_.get(), kSharedMemoryPoison, bytes);
    }
  }
  Block(Block const&) = delete;
  Block& operator=(Block const&) = delete;

  // The body of the block's OS thread.
  void run() {
    current_ = this;
    started_.store(true);
    try {
      os_context_.adopt_current_thread();
      stacks_ = StackArena(num_threads_, config_.stack_bytes ? config_.stack_bytes : default_stack_bytes());
      for (uint32_t i = 0; i < num_threads_; ++i)
        threads_[i].context.prepare(stacks_.stack_low(i), stacks_.stack_bytes(), &Block::fiber_main, &threads_[i]);
      scheduler_.run(os_context_);
    } catch (std::exception const& e) {
      config_.control->fail(ErrorKind::InvalidConfig, name() + ": " + e.what());
    }
    for (uint32_t i = 0; i < num_threads_; ++i) threads_[i].context.destroy();
    stacks_.release();
    finished_.store(true);
    current_ = nullptr;
  }

  // The block whose OS thread this is (nullptr outside a launch).
  static Block* current() { return current_; }

  Dim3 const& grid_dim() const { return config_.grid_dim; }
  Dim3 const& block_dim() const { return config_.block_dim; }
  Dim3 const& block_idx() const { return config_.block_idx; }
  void* dynamic_smem() const { return dynamic_smem_.get(); }
  Scheduler& scheduler() { return scheduler_; }
  BarrierSet& barriers() { return barriers_; }
  BarrierSet const& barriers() const { return barriers_; }
  WarpCollectives& warp(uint32_t warp_idx) { return warps_[warp_idx]; }
  WarpCollectives const& warp(uint32_t warp_idx) const { return warps_[warp_idx]; }
  uint32_t num_threads() const { return num_threads_; }
  uint32_t num_warps() const { return num_warps_; }
  SimtThread const& thread(uint32_t linear_idx) const { return threads_[linear_idx]; }
  bool started() const { return started_.load(); }
  bool finished() const { return finished_.load(); }

  // "grid 'rank1' block (2,0,0)"
  std::string name() const {
    char buffer[256];
    Dim3 const b = config_.block_idx;
    std::snprintf(buffer, sizeof buffer, "grid '%s' block (%u,%u,%u)", config_.grid_name->c_str(), b.x, b.y, b.z);
    return buffer;
  }
  std::string thread_name(SimtThread const& t) const {
    char buffer[128];
    std::snprintf(buffer, sizeof buffer, " thread (%u,%u,%u) [warp %u lane %u]", t.thread_idx.x, t.thread_idx.y,
                  t.thread_idx.z, t.warp_idx, t.lane_idx);
    return name() + buffer;
  }

 private:
  static void fiber_main(void* arg) {
    FiberContext::on_fiber_start();
    SimtThread& me = *static_cast<SimtThread*>(arg);
    Block& block = *current_;
    block.scheduler_.on_fiber_start();
    LaunchControl& control = *block.config_.control;
    try {
      (*block.config_.kernel)();
    } catch (InvalidUsage const& e) {
      control.fail(ErrorKind::InvalidUsage, "SIMT rule broken in " + block.name() + ": " + e.what());
    } catch (KernelTrap const& e) {
      control.fail(ErrorKind::Trap, "kernel trapped in " + block.thread_name(me) + ": " + e.what());
    } catch (std::exception const& e) {
      control.fail(ErrorKind::KernelException, "exception in " + block.thread_name(me) + ": " + e.what());
    } catch (...) {
      control.fail(ErrorKind::KernelException, "unknown exception in " + block.thread_name(me));
    }
    block.scheduler_.retire_current();
    block.barriers_.on_thread_exit();
    block.warps_[me.warp_idx].on_lane_exit(me.lane_idx);
    block.scheduler_.exit_current();
  }

  static void report_deadlock(void* self) {
    auto& block = *static_cast<Block*>(self);
    block.config_.control->fail(ErrorKind::Deadlock,
                                "deadlock: every live thread of " + block.name() +
                                    " is blocked on a barrier or warp collective that can never complete");
  }

  BlockConfig config_;
  uint32_t num_threads_ = 0, num_warps_ = 0;
  std::unique_ptr<SimtThread[]> threads_;
  std::unique_ptr<WarpCollectives[]> warps_;
  Scheduler scheduler_;
  BarrierSet barriers_;
  FiberContext os_context_;
  StackArena stacks_;
  struct FreeDeleter {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, FreeDeleter> dynamic_smem_;
  Relaxed<bool> started_{false}, finished_{false};
  static inline thread_local Block* current_ = nullptr;
};

}  // namespace epcomm::simt
