#pragma once
// Watchdog: bounds how long a launch may run. When the time limit passes it
// fails the launch with ErrorKind::Timeout; every block then stops at its
// threads' next sync point, which freezes each thread's wait record for the
// dump. A block that never reaches a sync point again (a spin loop that does
// not poll through a helper) is reported as unresponsive instead of hanging
// the caller.

#include <chrono>
#include <string>

#include "control.hpp"

namespace epcomm::simt {

// EPCOMM_SIMT_TIMEOUT_MS, or 60 s.
inline std::chrono::milliseconds default_launch_timeout() {
  if (char const* env = std::getenv("EPCOMM_SIMT_TIMEOUT_MS")) {
    long long ms = std::atoll(env);
    if (ms > 0) return std::chrono::milliseconds(ms);
  }
  return std::chrono::seconds(60);
}

struct WatchdogResult {
  bool timed_out = false;
  bool all_blocks_stopped = true;  // false: some OS threads are still running and must be detached
};

inline WatchdogResult watch_launch(LaunchControl& control, std::string const& launch_name,
                                   std::chrono::milliseconds timeout, std::chrono::milliseconds abort_grace) {
  WatchdogResult result;
  auto const start = std::chrono::steady_clock::now();
  if (control.wait_until(start + timeout)) return result;
  result.timed_out = true;
  control.fail(ErrorKind::Timeout, "watchdog: launch '" + launch_name + "' still running after " +
                                       std::to_string(timeout.count()) + " ms (" +
                                       std::to_string(control.blocks_running()) + " blocks not finished)");
  result.all_blocks_stopped = control.wait_until(std::chrono::steady_clock::now() + abort_grace);
  return result;
}

}  // namespace epcomm::simt
