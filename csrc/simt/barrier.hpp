#pragma once
// Block barriers: __syncthreads and the named barriers of bar.sync / bar.arrive.
//
// Each of the 16 barrier ids is a generation barrier. Every arrival of one
// generation must pass the same thread count (a mismatch is an error, as the
// hardware result would be undefined). __syncthreads is barrier 0 counting
// every live thread: a thread that exited no longer counts, as on the GPU.
// Memory: arrivals and the release go through acq_rel/acquire atomics, so all
// writes before the barrier happen-before all reads after it, for the C++
// memory model and for ThreadSanitizer alike.

#include <atomic>
#include <cstdio>
#include <string>

#include "errors.hpp"
#include "scheduler.hpp"
#include "sync_site.hpp"

namespace epcomm::simt {

class BarrierSet {
 public:
  static constexpr uint32_t kNumBarriers = 16;

  void init(Scheduler* scheduler, uint32_t num_threads) {
    scheduler_ = scheduler;
    num_threads_ = num_threads;
  }

  // __syncthreads(): barrier 0, all live threads.
  void sync_all(SyncSite const& site) { arrive(0, kAllLiveThreads, true, "__syncthreads", site); }

  // bar.sync id, num_threads: waits until num_threads threads arrived.
  void sync(uint32_t id, uint32_t num_threads, char const* what, SyncSite const& site) {
    check_arguments(id, num_threads, what, site);
    arrive(id, num_threads, true, what, site);
  }

  // bar.arrive id, num_threads: counts towards the barrier without waiting.
  void arrive_only(uint32_t id, uint32_t num_threads, char const* what, SyncSite const& site) {
    check_arguments(id, num_threads, what, site);
    arrive(id, num_threads, false, what, site);
    scheduler_->pass();
  }

  // A thread exited: __syncthreads may now be complete without it.
  void on_thread_exit() {
    Slot& slot = slots_[0];
    if (slot.arrived.load() > 0 && slot.expected.load() == kAllLiveThreads && is_complete(slot)) release(0);
  }

  uint32_t arrived(uint32_t id) const { return slots_[id].arrived.load(); }

 private:
  static constexpr uint32_t kAllLiveThreads = 0;

  struct Slot {
    Relaxed<uint32_t> arrived{0};
    Relaxed<uint32_t> expected{0};  // the thread count of the current generation
    std::atomic<uint32_t> generation{0};
    std::atomic<uint32_t> order{0};  // arrivals chain their writes through this acq_rel counter
  };

  void check_arguments(uint32_t id, uint32_t num_threads, char const* what, SyncSite const& site) {
    if (id >= kNumBarriers)
      throw InvalidUsage(describe(what, site) + ": barrier id " + std::to_string(id) + " out of range [0, 16)");
    if (num_threads == 0 || num_threads % kWarpSize != 0 || num_threads > num_threads_)
      throw InvalidUsage(describe(what, site) + ": thread count " + std::to_string(num_threads) +
                         " must be a non-zero multiple of 32 and at most the block size " +
                         std::to_string(num_threads_));
  }

  void arrive(uint32_t id, uint32_t count, bool wait, char const* what, SyncSite const& site) {
    Slot& slot = slots_[id];
    SimtThread& me = scheduler_->current();
    uint32_t arrived = slot.arrived.load();
    if (arrived == 0) {
      slot.expected.store(count);
    } else if (slot.expected.load() != count) {
      throw InvalidUsage(describe(what, site) + ": barrier " + std::to_string(id) + " reached with thread count " +
                         count_name(count) + " while " + std::to_string(arrived) +
                         " threads already wait on it with thread count " + count_name(slot.expected.load()));
    }
    slot.order.fetch_add(1, std::memory_order_acq_rel);
    slot.arrived.store(arrived + 1);
    uint32_t generation = slot.generation.load(std::memory_order_relaxed);
    me.wait.record(SyncKind::Barrier, what, site, 0, id, count);
    if (is_complete(slot)) {
      release(id);
      if (wait) scheduler_->pass();
      return;
    }
    if (!wait) return;
    me.waiting_barrier.store(int32_t(id));
    while (slot.generation.load(std::memory_order_acquire) == generation) {
      me.state.store(RunState::Blocked);
      scheduler_->block();
    }
    me.waiting_barrier.store(-1);
  }

  bool is_complete(Slot const& slot) const {
    uint32_t expected = slot.expected.load();
    return slot.arrived.load() >= (expected == kAllLiveThreads ? scheduler_->live_threads() : expected);
  }

  void release(uint32_t id) {
    Slot& slot = slots_[id];
    slot.order.fetch_add(0, std::memory_order_acq_rel);  // acquire every arrival's writes...
    slot.arrived.store(0);
    slot.generation.fetch_add(1, std::memory_order_release);  // ...and hand them to every waiter
    SimtThread* threads = scheduler_->threads();
    for (uint32_t i = 0; i < num_threads_; ++i) {
      if (threads[i].waiting_barrier.load() == int32_t(id)) scheduler_->wake(threads[i]);
    }
  }

  std::string describe(char const* what, SyncSite const& site) const {
    Dim3 const t = scheduler_->current().thread_idx;
    char buffer[512];
    std::snprintf(buffer, sizeof buffer, "%s at %s:%u (%s), thread (%u,%u,%u)", what, site.file_name(),
                  unsigned(site.line()), site.function_name(), t.x, t.y, t.z);
    return buffer;
  }
  static std::string count_name(uint32_t count) {
    return count == kAllLiveThreads ? std::string("\"all live threads\" (__syncthreads)") : std::to_string(count);
  }

  Scheduler* scheduler_ = nullptr;
  uint32_t num_threads_ = 0;
  Slot slots_[kNumBarriers];
};

}  // namespace epcomm::simt
