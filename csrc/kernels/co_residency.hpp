#pragma once
// Can a channel kernel's grid be resident all at once on this device? The blocks of a channel wait on
// each other (intranode: sender 2c and receiver 2c + 1; internode: 3c, 3c + 1, 3c + 2, and the abort
// watcher waits for every warp of the grid), on this rank and on its peers. A block spins where it
// stands and CUDA schedules a waiting block only when an SM frees up, so a grid larger than the
// device can hold may leave a channel half-resident: it spins until the kernels' timeout. The CUDA
// launchers (*_launch.cu) ask before <<<>>> and refuse such a grid with kCoResidencyRefused, filling
// a CoResidency that describe_co_residency turns into the message.
//
// What this cannot see: the occupancy API answers for an idle device. Blocks of kernels on other
// streams (an overlapped persistent kernel, a compute kernel still draining) can hold SMs at launch
// time; then the check passes, the grid runs partly resident, and the kernels' own timeout (ErrorSlot,
// kTimeout) is what fires. Leave them room with Config(num_sms=...).
//
// The rule and the message are plain C++ (tested on the CPU, csrc/tests/test_co_residency.cpp); the
// query of the device is co_residency_check.hpp (nvcc-compiled host code).

#include <string>

namespace epcomm::kernels {

// One channel kernel's grid (num_channels x blocks_per_channel blocks) against the current device.
struct CoResidency {
  char const* kernel = "";
  int num_channels = 0, blocks_per_channel = 0, threads_per_block = 0;
  int device_sms = 0;     // multiProcessorCount of the current device
  int blocks_per_sm = 0;  // of this kernel at threads_per_block (occupancy API); asked only when blocks() > device_sms

  int blocks() const { return num_channels * blocks_per_channel; }
  int sms_needed() const { return blocks_per_sm > 0 ? (blocks() + blocks_per_sm - 1) / blocks_per_sm : -1; }
  // A block per SM fits whatever the kernel's resources (one that cannot hold even one block fails its
  // launch with its own error), so blocks_per_sm is needed only beyond that.
  bool fits_without_occupancy() const { return blocks() <= device_sms; }
  bool fits_at_once() const { return fits_without_occupancy() || blocks() <= blocks_per_sm * device_sms; }
};

// The message for a refused grid: what it needs, what the device holds, and the Config that fits.
inline std::string describe_co_residency(CoResidency const& grid) {
  std::string const b = std::to_string(grid.blocks_per_channel);
  std::string text = std::string(grid.kernel) + " needs its " + b + " x C blocks co-resident (the " + b +
                     " blocks of a channel wait on each other): C=" + std::to_string(grid.num_channels) +
                     " channels -> " + std::to_string(grid.blocks()) + " blocks of " +
                     std::to_string(grid.threads_per_block) + " threads at " + std::to_string(grid.blocks_per_sm) +
                     " blocks/SM -> ";
  if (grid.blocks_per_sm < 1) return text + "no SM can hold one such block";
  text += std::to_string(grid.sms_needed()) + " SMs, the device has " + std::to_string(grid.device_sms) + " SMs. ";
  // Config(num_sms=N) runs N / 2 channels (epcomm/config.py)
  int const max_channels = grid.blocks_per_sm * grid.device_sms / grid.blocks_per_channel;
  if (max_channels < 1) return text + "Not even one channel fits this device";
  return text + "Use fewer channels: Config(num_sms=N) runs N / 2 channels; N <= " + std::to_string(2 * max_channels) +
         " fits this device when nothing else runs on it (kernels of other streams take SMs too: leave them room)";
}

}  // namespace epcomm::kernels
