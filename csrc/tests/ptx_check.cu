// Compiled by nvcc for sm_90 only (no GPU here): the same kernel source the
// SIMT tests run on the CPU must produce the intended PTX instructions.
// csrc/Makefile (target ptx-check) greps the generated PTX for them.

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "kernels/ring_channel.cuh"

namespace epcomm::test {

// Touches every ptx.cuh helper once, so each instruction shows up in the PTX.
EPCOMM_GLOBAL void every_helper_kernel(int* flags, unsigned long long* wide, int* out) {
  int acquired = ptx::ld_acquire_sys_global(flags) + ptx::ld_acquire_gpu_global(flags + 1);
  unsigned long long wide_acquired = ptx::ld_acquire_sys_global(wide);
  int relaxed = ptx::ld_relaxed_sys_global(flags + 2) + ptx::ld_volatile_global(flags + 3);
  int read_only = ptx::ld_nc_global(flags + 4);
  ptx::st_release_sys_global(flags + 5, acquired);
  ptx::st_release_sys_global(wide + 1, wide_acquired);
  ptx::st_relaxed_sys_global(flags + 6, relaxed);
  ptx::st_na_global(flags + 7, read_only);
  int old = ptx::atomic_add_release_sys_global(flags + 8, 1);
  ptx::fence_acq_rel_sys();
  ptx::fence_acq_rel_gpu();
  ptx::fence_acq_rel_cta();
  ptx::bar_sync(1, 64);
  ptx::bar_arrive(2, 64);
  bool leader = ptx::elect_one_sync();
  ptx::syncwarp();
  int broadcast = ptx::shfl_sync(0xffffffffu, old, 0);
  unsigned votes = ptx::ballot_sync(0xffffffffu, leader);
  long long start = ptx::read_clock64();
  ptx::nanosleep_ns(100);
  if (broadcast < 0) ptx::trap();
  out[threadIdx.x] = int(votes) + int(ptx::read_clock64() - start) + int(ptx::get_lane_id());
}

// A .cu launcher: the one kind of file where <<<>>> is allowed.
void launch_ring_blocks(RingChannel* channels, long long* results, int num_channels, int num_messages) {
  ring_blocks_kernel<<<2 * num_channels, 32>>>(channels, results, num_messages, 7);
}

}  // namespace epcomm::test
