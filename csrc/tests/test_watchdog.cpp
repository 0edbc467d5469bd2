// The watchdog, and the other ways a launch fails without aborting the process.
#include <atomic>
#include <thread>
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "harness.hpp"

using namespace epcomm;

namespace {

simt::LaunchOptions options_with_timeout(char const* name, int timeout_ms) {
  simt::LaunchOptions options;
  options.name = name;
  options.timeout = std::chrono::milliseconds(timeout_ms);
  options.abort_grace = std::chrono::milliseconds(2000);
  return options;
}

// Block 0's lane 0 waits for a flag no one sets; its other lanes wait for it in __syncwarp.
EPCOMM_GLOBAL void never_signalled_kernel(int* flag) {
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) {
      while (ptx::ld_acquire_sys_global(flag) == 0) {
      }
    }
    __syncwarp();
  }
}

EPCOMM_TEST(watchdog_fires_with_a_readable_dump) {
  int flag = 0;
  auto const start = std::chrono::steady_clock::now();
  std::string message = CHECK_LAUNCH_FAILS(
      simt::try_launch(options_with_timeout("never_signalled", 300), 2, 32, 0, never_signalled_kernel, &flag),
      simt::ErrorKind::Timeout);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  CHECK_CONTAINS(message, "watchdog: launch 'never_signalled' still running after 300 ms");
  CHECK_CONTAINS(message, "grid 'never_signalled' block (0,0,0)");
  CHECK_CONTAINS(message, "warp 0 lane 0: spinning/last sync point ld_acquire_sys_global(");
  CHECK_CONTAINS(message, "last value 0");
  CHECK_CONTAINS(message, "test_watchdog.cpp:");
  CHECK_CONTAINS(message, "never_signalled_kernel");
  CHECK_CONTAINS(message, "warp 0 lanes 1-31: blocked in __syncwarp(mask=0xffffffff) [lanes not arrived: 0x00000001]");
  if (std::getenv("EPCOMM_TEST_PRINT_DUMP")) std::printf("%s\n", message.c_str());
  // The runtime is still usable after a failed launch.
  flag = 1;
  simt::launch(options_with_timeout("signalled", 20000), 2, 32, 0, never_signalled_kernel, &flag);
}

EPCOMM_TEST(launch_error_is_an_exception_with_a_kind) {
  int flag = 0;
  try {
    simt::launch(options_with_timeout("throws", 200), 1, 32, 0, never_signalled_kernel, &flag);
    CHECK(false);
  } catch (simt::LaunchError const& error) {
    CHECK(error.kind() == simt::ErrorKind::Timeout);
  }
}

EPCOMM_GLOBAL void trap_kernel() {
  __syncthreads();
  if (threadIdx.x == 5) ptx::trap();
  __syncthreads();
}

EPCOMM_TEST(trap_fails_the_launch) {
  std::string message = CHECK_LAUNCH_FAILS(simt::try_launch(options_with_timeout("trap", 20000), 2, 64, 0, trap_kernel),
                                           simt::ErrorKind::Trap);
  CHECK_CONTAINS(message, "thread (5,0,0)");
  CHECK_CONTAINS(message, "test_watchdog.cpp");
}

EPCOMM_GLOBAL void throwing_kernel() {
  if (threadIdx.x == 0 && blockIdx.x == 1) throw std::runtime_error("host-side failure inside a kernel");
}

EPCOMM_TEST(exceptions_fail_the_launch) {
  std::string message = CHECK_LAUNCH_FAILS(
      simt::try_launch(options_with_timeout("throwing", 20000), 2, 32, 0, throwing_kernel), simt::ErrorKind::KernelException);
  CHECK_CONTAINS(message, "host-side failure inside a kernel");
  CHECK_CONTAINS(message, "block (1,0,0)");
}

EPCOMM_GLOBAL void empty_kernel() {}

EPCOMM_TEST(invalid_configurations_are_rejected) {
  CHECK_LAUNCH_FAILS(simt::try_launch(options_with_timeout("too_big", 1000), 1, 2048, 0, empty_kernel),
                     simt::ErrorKind::InvalidConfig);
  CHECK_LAUNCH_FAILS(simt::try_launch(options_with_timeout("empty_grid", 1000), 0, 32, 0, empty_kernel),
                     simt::ErrorKind::InvalidConfig);
}

// A loop that never reaches a sync point cannot be stopped: the launch still
// returns (the block's OS thread is left running) instead of hanging.
EPCOMM_GLOBAL void unresponsive_kernel(int* flag) {
  if (threadIdx.x == 0) {
    while (std::atomic_ref<int>(*flag).load(std::memory_order_acquire) == 0) {
    }
  }
}

EPCOMM_TEST(unresponsive_block_is_reported_not_waited_for) {
  static int flag = 0;  // outlives the detached block thread
  simt::LaunchOptions options = options_with_timeout("unresponsive", 200);
  options.abort_grace = std::chrono::milliseconds(200);
  std::string message = CHECK_LAUNCH_FAILS(simt::try_launch(options, 1, 32, 0, unresponsive_kernel, &flag),
                                           simt::ErrorKind::Timeout);
  CHECK_CONTAINS(message, "unresponsive blocks");
  CHECK_CONTAINS(message, "grid 'unresponsive' block (0,0,0)");
  std::atomic_ref<int>(flag).store(1, std::memory_order_release);  // let the detached thread finish
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

}  // namespace
