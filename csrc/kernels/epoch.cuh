#pragma once
// The epoch of a notify (its barrier's target, its call header's tag; its parity picks the
// double-buffered counts): one more than the last notify's on these buffers, counted on the device
// in this rank's own NVL buffer rather than passed from the host, so a notify replayed from a CUDA
// graph with the arguments it was captured with still advances it. Only this rank's notify kernels
// touch the counter, one after another in stream order, so plain accesses suffice. Every rank runs
// the same notifies, so the counts agree; re-laying out the buffers zeroes the counter with the rest.

#include <cstdint>

#include "../common/compat.cuh"

namespace epcomm::kernels {

// Every thread of the (one) block that runs the notify calls it; each gets the same new epoch.
EPCOMM_DEVICE int64_t advance_epoch(int64_t* counter) {
  __shared__ int64_t epoch;
  if (threadIdx.x == 0) {
    epoch = *counter + 1;
    *counter = epoch;
  }
  __syncthreads();
  return epoch;
}

EPCOMM_HOST_DEVICE int epoch_parity(int64_t epoch) { return int(epoch & 1); }

}  // namespace epcomm::kernels
