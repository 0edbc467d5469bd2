#pragma once
// Fiber stacks and the switch between two fibers (or a fiber and its OS thread).

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "context_switch.hpp"
#include "sanitizer.hpp"

namespace epcomm::simt {

// 64 KiB per CUDA thread; sanitizers grow frames a lot, so they get 256 KiB.
// EPCOMM_SIMT_STACK_KIB overrides both.
inline size_t default_stack_bytes() {
  if (char const* env = std::getenv("EPCOMM_SIMT_STACK_KIB")) {
    long kib = std::atol(env);
    if (kib >= 16) return size_t(kib) * 1024;
  }
  return sanitizer::kEnabled ? 256 * 1024 : 64 * 1024;
}

namespace detail {

// Guard pages split a mapping into separate VMAs, and the kernel caps the
// number of VMAs per process (vm.max_map_count, 65530 by default). Large
// launches (hundreds of thousands of fibers) therefore go without guards
// once half of that budget is in use.
class GuardPageBudget {
 public:
  static bool try_reserve(size_t guards) {
    static size_t const limit = read_max_map_count() / 2;
    size_t used = in_use().fetch_add(guards);
    if (used + guards <= limit) return true;
    in_use().fetch_sub(guards);
    return false;
  }
  static void release(size_t guards) { in_use().fetch_sub(guards); }

 private:
  static std::atomic<size_t>& in_use() {
    static std::atomic<size_t> count{0};
    return count;
  }
  static size_t read_max_map_count() {
    size_t value = 65530;
    if (FILE* file = std::fopen("/proc/sys/vm/max_map_count", "r")) {
      unsigned long parsed = 0;
      if (std::fscanf(file, "%lu", &parsed) == 1) value = parsed;
      std::fclose(file);
    }
    return value;
  }
};

}  // namespace detail

// One mapping holding the stacks of all fibers of a block, each stack with a
// PROT_NONE guard page below it (when the VMA budget allows), so a stack
// overflow faults instead of silently corrupting the neighbouring fiber.
class StackArena {
 public:
  StackArena() = default;
  StackArena(size_t num_stacks, size_t stack_bytes) : num_stacks_(num_stacks) {
    page_bytes_ = size_t(sysconf(_SC_PAGESIZE));
    stack_bytes_ = (stack_bytes + page_bytes_ - 1) / page_bytes_ * page_bytes_;
    stride_ = stack_bytes_ + page_bytes_;
    total_bytes_ = stride_ * num_stacks;
    base_ = mmap(nullptr, total_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base_ == MAP_FAILED) {
      base_ = nullptr;
      throw std::runtime_error("epcomm simt: cannot map fiber stacks");
    }
    if (detail::GuardPageBudget::try_reserve(2 * num_stacks)) {
      guarded_ = true;
      for (size_t i = 0; i < num_stacks; ++i) mprotect(static_cast<char*>(base_) + i * stride_, page_bytes_, PROT_NONE);
    }
  }
  StackArena(StackArena const&) = delete;
  StackArena& operator=(StackArena const&) = delete;
  StackArena& operator=(StackArena&& other) noexcept {
    release();
    std::swap(base_, other.base_);
    std::swap(num_stacks_, other.num_stacks_);
    std::swap(stack_bytes_, other.stack_bytes_);
    std::swap(stride_, other.stride_);
    std::swap(total_bytes_, other.total_bytes_);
    std::swap(page_bytes_, other.page_bytes_);
    std::swap(guarded_, other.guarded_);
    return *this;
  }
  ~StackArena() { release(); }

  void* stack_low(size_t index) const { return static_cast<char*>(base_) + index * stride_ + page_bytes_; }
  size_t stack_bytes() const { return stack_bytes_; }

  void release() {
    if (!base_) return;
    for (size_t i = 0; i < num_stacks_; ++i) sanitizer::asan_unpoison(stack_low(i), stack_bytes_);
    munmap(base_, total_bytes_);
    if (guarded_) detail::GuardPageBudget::release(2 * num_stacks_);
    base_ = nullptr;
    guarded_ = false;
  }

 private:
  void* base_ = nullptr;
  size_t num_stacks_ = 0, stack_bytes_ = 0, stride_ = 0, total_bytes_ = 0, page_bytes_ = 0;
  bool guarded_ = false;
};

// One side of a switch: a fiber, or the OS thread's own stack.
class FiberContext {
 public:
  // The OS thread that will run the fibers; its stack bounds are needed by ASan.
  void adopt_current_thread() {
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* low = nullptr;
      size_t size = 0;
      pthread_attr_getstack(&attr, &low, &size);
      stack_low_ = low;
      stack_bytes_ = size;
      pthread_attr_destroy(&attr);
    }
    tsan_fiber_ = sanitizer::tsan_current_fiber();
    owns_tsan_fiber_ = false;
  }

  void prepare(void* stack_low, size_t stack_bytes, detail::FiberEntry entry, void* arg) {
    stack_low_ = stack_low;
    stack_bytes_ = stack_bytes;
    machine_.prepare(stack_low, stack_bytes, entry, arg);
    tsan_fiber_ = sanitizer::tsan_create_fiber();
    owns_tsan_fiber_ = true;
  }

  // Called from another context once this fiber will never run again.
  void destroy() {
    if (owns_tsan_fiber_) sanitizer::tsan_destroy_fiber(tsan_fiber_);
  }

  // Runs `to` until something switches back to `from`. `from_is_leaving`:
  // `from` will never be resumed (its ASan fake stack can go, and for TSAN
  // everything it did happens-before what `to` does next).
  static void switch_to(FiberContext& from, FiberContext& to, bool from_is_leaving) {
    sanitizer::asan_start_switch(from_is_leaving ? nullptr : &from.asan_fake_stack_, to.stack_low_, to.stack_bytes_);
    sanitizer::tsan_switch_to_fiber(to.tsan_fiber_, from_is_leaving);
    detail::MachineContext::swap(from.machine_, to.machine_);
    sanitizer::asan_finish_switch(from.asan_fake_stack_);
  }

  // The first thing a new fiber runs (there is no `switch_to` to return into).
  static void on_fiber_start() { sanitizer::asan_finish_switch(nullptr); }

 private:
  detail::MachineContext machine_;
  void* stack_low_ = nullptr;
  size_t stack_bytes_ = 0;
  void* tsan_fiber_ = nullptr;
  bool owns_tsan_fiber_ = false;
  void* asan_fake_stack_ = nullptr;
};

}  // namespace epcomm::simt
