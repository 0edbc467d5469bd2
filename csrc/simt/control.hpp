#pragma once
// LaunchControl: what the blocks of one launch (all its grids) share with the
// host thread that waits for them: the abort flag, the first error, and the
// count of blocks still running.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>

#include "errors.hpp"

namespace epcomm::simt {

class LaunchControl {
 public:
  explicit LaunchControl(int num_blocks) : blocks_running_(num_blocks) {}

  // The first failure wins; every block then stops at its threads' next sync point.
  void fail(ErrorKind kind, std::string message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (kind_ == ErrorKind::None) {
        kind_ = kind;
        message_ = std::move(message);
      }
    }
    abort_.store(true, std::memory_order_relaxed);
  }
  bool aborting() const { return abort_.load(std::memory_order_relaxed); }

  void block_finished() {
    std::lock_guard<std::mutex> lock(mutex_);
    --blocks_running_;
    finished_.notify_all();
  }
  void block_not_started() { block_finished(); }

  // True if every block finished before the deadline.
  bool wait_until(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    return finished_.wait_until(lock, deadline, [&] { return blocks_running_ == 0; });
  }
  int blocks_running() {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_running_;
  }

  LaunchStatus status() {
    std::lock_guard<std::mutex> lock(mutex_);
    return LaunchStatus{kind_, message_};
  }

 private:
  std::atomic<bool> abort_{false};
  std::mutex mutex_;
  std::condition_variable finished_;
  int blocks_running_;
  ErrorKind kind_ = ErrorKind::None;
  std::string message_;
};

}  // namespace epcomm::simt
