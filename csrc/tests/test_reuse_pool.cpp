// The pools the cuda runtime keeps its mapped ErrorSlots and marker events in (runtime/reuse_pool.hpp):
// a steady state of calls makes nothing, so no call on buffers already set up allocates, frees or
// synchronizes the device (issue: one cudaHostAlloc + cudaFreeHost per call synchronized the device).
#include <atomic>
#include <set>
#include <thread>
#include <vector>

#include "../runtime/reuse_pool.hpp"
#include "harness.hpp"

using namespace epcomm;

namespace {

// Stands in for a driver object: a distinct id per item made.
struct Made {
  std::atomic<int> count{0};
  int make() { return count.fetch_add(1) + 1; }
};

}  // namespace

// The runtime's call pattern, one call at a time: take at launch, give back once the grid ended.
EPCOMM_TEST(reuse_pool_makes_one_item_for_calls_one_at_a_time) {
  Made made;
  runtime::ReusePool<int> pool([&] { return made.make(); });
  for (int call = 0; call < 1000; ++call) {
    int const slot = pool.take();
    CHECK_EQ(slot, 1);
    pool.give_back(slot);
  }
  CHECK_EQ(made.count.load(), 1);
  CHECK_EQ(pool.made(), size_t(1));
}

// Enqueued calls still pending hold their items: as many are made as were pending at once, and never two
// holders share one.
EPCOMM_TEST(reuse_pool_makes_as_many_items_as_calls_were_in_flight) {
  Made made;
  runtime::ReusePool<int> pool([&] { return made.make(); });
  for (int round = 0; round < 50; ++round) {
    std::vector<int> pending;
    for (int call = 0; call < 4; ++call) pending.push_back(pool.take());
    CHECK_EQ(std::set<int>(pending.begin(), pending.end()).size(), size_t(4));
    for (int slot : pending) pool.give_back(slot);
  }
  CHECK_EQ(pool.made(), size_t(4));
}

// Calls from several threads (the runtimes of one process share the ErrorSlot pool): at most one item per
// thread, none held twice at once (checked under ThreadSanitizer in `make check`).
EPCOMM_TEST(reuse_pool_is_shared_by_threads_without_making_per_call) {
  constexpr int kThreads = 4, kCalls = 2000;
  Made made;
  runtime::ReusePool<int> pool([&] { return made.make(); });
  std::vector<std::atomic<int>> holders(kThreads + 1);
  std::atomic<int> shared{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int call = 0; call < kCalls; ++call) {
        int const slot = pool.take();
        if (slot < 1 || slot > kThreads || holders[size_t(slot)].fetch_add(1) != 0) shared.fetch_add(1);
        holders[size_t(slot)].fetch_sub(1);
        pool.give_back(slot);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  CHECK_EQ(shared.load(), 0);
  CHECK(pool.made() >= size_t(1) && pool.made() <= size_t(kThreads));
  CHECK_EQ(pool.take_all().size(), pool.made());  // every item back in the pool for the owner's teardown
}
