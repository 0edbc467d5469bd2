#pragma once
// Scheduler: runs the CUDA threads of one block as fibers on the block's OS
// thread.
//
// A fiber gives up the CPU only at sync points: `pass()` (it stays runnable:
// loads, stores, atomics, clock64, ...) or `block()` (it waits for `wake()`:
// barriers, warp collectives). Runnable fibers are served round-robin, or in
// a seeded random order when fuzzing, and every wrap-around of the ready
// queue calls sched_yield, so a block whose threads spin lets the other
// blocks' OS threads run. If every live fiber of the block is blocked, that
// is a deadlock no other block can resolve: the launch fails at once.
// When the launch aborts, each fiber is abandoned at its next sync point
// (never resumed again, never unwound) and the OS thread takes over.

#include <sched.h>

#include <cstdlib>
#include <memory>

#include "control.hpp"
#include "fiber.hpp"
#include "fuzz.hpp"
#include "relaxed.hpp"
#include "thread_state.hpp"

namespace epcomm::simt {

class Scheduler {
 public:
  using DeadlockHandler = void (*)(void* context);

  void init(SimtThread* threads, uint32_t num_threads, LaunchControl* control, uint64_t fuzz_seed,
            uint64_t fuzz_stream, DeadlockHandler on_deadlock, void* handler_context) {
    threads_ = threads;
    num_threads_ = num_threads;
    control_ = control;
    on_deadlock_ = on_deadlock;
    handler_context_ = handler_context;
    fuzz_.init(fuzz_seed, fuzz_stream);
    ring_ = std::make_unique<Relaxed<SimtThread*>[]>(num_threads);
    for (uint32_t i = 0; i < num_threads; ++i) push(threads[i]);
    live_threads_.store(num_threads);
  }

  // On the block's OS thread: runs the fibers until all have exited or the
  // launch aborted. Fibers that exit (or are abandoned) come back here, and
  // this loop dispatches the next one: a leaving fiber's switch is the one
  // switch that synchronizes for TSAN, and it must not order the leaving
  // thread before the next kernel thread.
  void run(FiberContext& os_context) {
    os_context_ = &os_context;
    start_token_.store(1, std::memory_order_release);
    while (!control_->aborting()) {
      SimtThread* next = pop_next();
      if (!next) {
        if (live_threads_.load() != 0) on_deadlock_(handler_context_);
        break;
      }
      next->state.store(RunState::Running);
      current_.store(next);
      FiberContext::switch_to(os_context, next->context, false);
      current_.store(nullptr);
    }
    if (control_->aborting()) let_suspended_fibers_leave(os_context);
  }

  // First call of every fiber: everything the OS thread set up before run()
  // happens-before the fiber's own code.
  void on_fiber_start() {
    (void)start_token_.load(std::memory_order_acquire);
    SimtThread& me = current();
    if (control_->aborting()) abandon(me);
  }

  SimtThread& current() const { return *current_.load(); }
  bool in_fiber() const { return current_.load() != nullptr; }
  uint32_t live_threads() const { return live_threads_.load(); }
  SimtThread* threads() const { return threads_; }
  uint32_t num_threads() const { return num_threads_; }

  // A non-blocking sync point: let the other runnable threads go first.
  void pass() {
    SimtThread& me = current();
    if (control_->aborting()) abandon(me);
    fuzz_.maybe_perturb_os();
    if (fuzz_.skip_yield()) return;
    me.state.store(RunState::Ready);
    push(me);
    SimtThread* next = pop_next();
    if (next != &me) {
      switch_to(me, *next, false);
    } else {
      me.state.store(RunState::Running);
    }
    if (control_->aborting()) abandon(me);
  }

  // The caller marked the current thread Blocked and recorded why; returns
  // once some other thread woke it.
  void block() {
    SimtThread& me = current();
    if (control_->aborting()) abandon(me);
    SimtThread* next = pop_next();
    if (!next) {
      on_deadlock_(handler_context_);
      abandon(me);
    }
    switch_to(me, *next, false);
    if (control_->aborting()) abandon(me);
  }

  void wake(SimtThread& thread) {
    if (thread.state.load() != RunState::Blocked) return;
    thread.state.store(RunState::Ready);
    push(thread);
  }

  // The current thread returned from the kernel: it stops counting as live
  // (call before the barrier and warp exit hooks, which count live threads).
  void retire_current() {
    current().state.store(RunState::Exited);
    live_threads_.store(live_threads_.load() - 1);
  }

  // Leaves the retired current fiber for good.
  [[noreturn]] void exit_current() { leave_to_os_thread(current()); }

 private:
  void push(SimtThread& thread) {
    uint32_t count = count_.load();
    ring_[(head_.load() + count) % num_threads_].store(&thread);
    count_.store(count + 1);
  }

  SimtThread* pop_next() {
    uint32_t count = count_.load();
    if (count == 0) return nullptr;
    uint32_t head = head_.load();
    if (uint32_t offset = fuzz_.pick(count); offset != 0) {
      auto& chosen = ring_[(head + offset) % num_threads_];
      SimtThread* picked = chosen.load();
      chosen.store(ring_[head].load());
      ring_[head].store(picked);
    }
    SimtThread* next = ring_[head].load();
    head_.store((head + 1) % num_threads_);
    count_.store(count - 1);
    // One wrap-around of the ready queue: give the CPU to other blocks.
    int32_t until_wrap = until_wrap_.load() - 1;
    if (until_wrap <= 0) {
      sched_yield();
      until_wrap = int32_t(count);
    }
    until_wrap_.store(until_wrap);
    return next;
  }

  void switch_to(SimtThread& me, SimtThread& next, bool me_is_leaving) {
    next.state.store(RunState::Running);
    current_.store(&next);
    FiberContext::switch_to(me.context, next.context, me_is_leaving);
  }

  // After an abort, resume each fiber still suspended in a sync point (or
  // never started) once: it sees the abort and leaves at once. Its last
  // accesses are then ordered before the teardown (TSAN) and ASan drops its
  // fake stack. Run states are left as they were, for the dump.
  void let_suspended_fibers_leave(FiberContext& os_context) {
    for (uint32_t i = 0; i < num_threads_; ++i) {
      SimtThread& thread = threads_[i];
      if (thread.has_left.load() || thread.state.load() == RunState::Exited) continue;
      current_.store(&thread);
      FiberContext::switch_to(os_context, thread.context, false);
      current_.store(nullptr);
    }
  }

  // The launch is aborting: this fiber stays where it is, forever.
  [[noreturn]] void abandon(SimtThread& me) { leave_to_os_thread(me); }

  [[noreturn]] void leave_to_os_thread(SimtThread& me) {
    me.has_left.store(true);
    FiberContext::switch_to(me.context, *os_context_, true);
    std::abort();  // unreachable: nobody resumes a fiber that left
  }

  SimtThread* threads_ = nullptr;
  uint32_t num_threads_ = 0;
  LaunchControl* control_ = nullptr;
  FiberContext* os_context_ = nullptr;
  DeadlockHandler on_deadlock_ = nullptr;
  void* handler_context_ = nullptr;
  FuzzPolicy fuzz_;

  std::unique_ptr<Relaxed<SimtThread*>[]> ring_;  // ready queue
  Relaxed<uint32_t> head_{0};
  Relaxed<uint32_t> count_{0};
  Relaxed<int32_t> until_wrap_{0};
  Relaxed<SimtThread*> current_{nullptr};
  Relaxed<uint32_t> live_threads_{0};
  std::atomic<int> start_token_{0};   // OS thread -> fibers: the setup happens-before every fiber
};

}  // namespace epcomm::simt
