#pragma once
// The device query of co_residency.hpp: before <<<>>>, the CUDA launchers (*_launch.cu) ask whether a
// channel kernel's grid fits the current device at once and refuse it otherwise (kCoResidencyRefused,
// CoResidency filled for describe_co_residency). Host code for nvcc-compiled files only.

#include <cuda_runtime.h>

#include "co_residency.hpp"

namespace epcomm::kernels {

// CUDA's own code for "a grid too large to be resident at once" (cooperative launches). A <<<>>>
// launch never returns it, so here it means only: the launcher refused the grid, see CoResidency.
inline constexpr int kCoResidencyRefused = int(cudaErrorCooperativeLaunchTooLarge);

// cudaSuccess when `grid` fits the current device at once; kCoResidencyRefused (and *refused = grid, when
// given) when it does not; else the failing query's cudaError_t. The kernels take no dynamic shared memory.
template <class Kernel>
int check_co_residency(Kernel kernel, CoResidency grid, CoResidency* refused) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&grid.device_sms, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return int(error);
  if (grid.fits_without_occupancy()) return int(cudaSuccess);  // the usual case: no occupancy query
  error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&grid.blocks_per_sm, kernel, grid.threads_per_block, 0);
  if (error != cudaSuccess) return int(error);
  if (grid.fits_at_once()) return int(cudaSuccess);
  if (refused != nullptr) *refused = grid;
  return kCoResidencyRefused;
}

}  // namespace epcomm::kernels
