#pragma once
// The cpu runtime's launch hook: runs a kernel through the SIMT layer on a cpu Stream and turns a
// failed launch into RuntimeError (watchdog timeout -> kTimeout, anything else -> kKernelFailed).
//
//   cpu_launch(call.stream, {"dispatch", rank, grid, block, smem, timeout_s}, kernel, args...);
//
// The SIMT watchdog is a backstop: it fires kWatchdogGraceS after the kernel's own peer timeout,
// so a kernel that checks its clock64() deadline reports first, with its own message.
// (The cuda counterpart is `kernel<<<grid, block, smem, stream>>>(args...)` in a .cu launcher.)

#include <chrono>
#include <string>

#include "../common/compat.cuh"
#include "../simt/simt.hpp"
#include "device_runtime.hpp"

namespace epcomm::runtime {

inline constexpr double kWatchdogGraceS = 10.0;

struct CpuLaunchConfig {
  std::string kernel_name;
  int rank = 0;
  dim3 grid{1, 1, 1};
  dim3 block{32, 1, 1};
  size_t dynamic_smem_bytes = 0;
  double timeout_s = 30.0;  // the kernel's own peer-wait limit
};

template <class Kernel, class... Args>
void cpu_launch(Stream& stream, CpuLaunchConfig const& config, Kernel kernel, Args... args) {
  (void)stream;  // cpu streams are synchronous and in order: the launch runs now, on this thread
  simt::LaunchOptions options;
  options.name = config.kernel_name + " (rank " + std::to_string(config.rank) + ")";
  options.timeout = std::chrono::milliseconds(int64_t((config.timeout_s + kWatchdogGraceS) * 1000));
  simt::LaunchStatus const status =
      simt::try_launch(options, config.grid, config.block, config.dynamic_smem_bytes, kernel, std::move(args)...);
  if (status.ok()) return;
  ErrorCode const code = status.kind == simt::ErrorKind::Timeout ? ErrorCode::kTimeout : ErrorCode::kKernelFailed;
  throw RuntimeError(code, "epcomm " + config.kernel_name + " on rank " + std::to_string(config.rank) + ": " +
                               simt::error_kind_name(status.kind) + ": " + status.message);
}

}  // namespace epcomm::runtime
