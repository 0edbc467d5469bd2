#pragma once
// Relaxed<T>: bookkeeping shared by the fibers of one block.
//
// All fibers of a block run on one OS thread, but ThreadSanitizer treats each
// fiber as a thread of its own. Keeping the scheduler's state in relaxed
// atomics makes it race-free for TSAN without adding any happens-before edge,
// which would hide real ordering bugs in kernels. On x86 a relaxed load or
// store compiles to a plain mov, so the normal build pays nothing.

#include <atomic>

namespace epcomm::simt {

template <class T>
class Relaxed {
 public:
  constexpr Relaxed(T value = T{}) noexcept : value_(value) {}
  Relaxed(Relaxed const&) = delete;
  Relaxed& operator=(Relaxed const&) = delete;

  T load() const noexcept { return value_.load(std::memory_order_relaxed); }
  void store(T value) noexcept { value_.store(value, std::memory_order_relaxed); }
  operator T() const noexcept { return load(); }
  Relaxed& operator=(T value) noexcept {
    store(value);
    return *this;
  }

 private:
  std::atomic<T> value_;
};

}  // namespace epcomm::simt
