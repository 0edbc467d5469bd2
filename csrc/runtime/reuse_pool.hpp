#pragma once
// A pool of driver objects made once and reused: take() hands out one given back earlier, or makes a new
// one only when every one made so far is in use. So a steady state of calls (take at launch, give back
// once the grid has ended) makes no object at all: as many are ever made as calls were in flight at once.
// The cuda runtime keeps its mapped ErrorSlots and its marker events in such pools (cuda_target.hpp,
// cuda_runtime.cu): making or freeing either per call would cost a device-wide synchronization. No CUDA
// here, so the CPU tests check the pool itself (csrc/tests/test_reuse_pool.cpp).

#include <cstddef>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace epcomm::runtime {

// Items given back for reuse, any thread.
template <class T>
class FreeList {
 public:
  std::optional<T> take() {
    std::lock_guard<std::mutex> const lock(mutex_);
    if (items_.empty()) return std::nullopt;
    T const item = items_.back();
    items_.pop_back();
    return item;
  }
  void give_back(T item) noexcept {
    std::lock_guard<std::mutex> const lock(mutex_);
    items_.push_back(item);
  }
  // Every item still here (a pool's teardown).
  std::vector<T> take_all() {
    std::lock_guard<std::mutex> const lock(mutex_);
    return std::exchange(items_, {});
  }

 private:
  std::mutex mutex_;
  std::vector<T> items_;
};

template <class T>
class ReusePool {
 public:
  // `make` makes a new item (and throws when it cannot).
  explicit ReusePool(std::function<T()> make) : make_(std::move(make)) {}

  T take() {
    if (std::optional<T> const item = free_.take()) return *item;
    T item = make_();
    std::lock_guard<std::mutex> const lock(count_mutex_);
    ++made_;
    return item;
  }
  void give_back(T item) noexcept { free_.give_back(std::move(item)); }
  // Every item not in use, for the owner to destroy (teardown).
  std::vector<T> take_all() { return free_.take_all(); }
  // Items made so far: the most that were in use at once.
  size_t made() {
    std::lock_guard<std::mutex> const lock(count_mutex_);
    return made_;
  }

 private:
  std::function<T()> make_;
  FreeList<T> free_;
  std::mutex count_mutex_;
  size_t made_ = 0;
};

}  // namespace epcomm::runtime
