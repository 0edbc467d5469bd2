#pragma once
// The peer barrier: every rank of one NVLink domain meets in peer memory.
//
// Each rank's barrier flags are kMaxRanks uint64 slots at the start of its control region; slot p
// is written only by rank p. A barrier has an epoch (1, 2, ... the same sequence on every rank):
//
//   1. signal: release-store the epoch into slot `rank` of every peer's flags (self included);
//   2. wait:   acquire-poll own slot p until it reaches the epoch, for every peer p.
//
// The release/acquire pair makes everything a rank wrote (to any peer's memory) before the barrier
// visible to every rank after it. Flags only grow, so a late peer's old epoch never passes a newer
// barrier. On timeout the kernel sets `status->timed_out` and leaves (no trap): the host reads its
// own flags to name the peers that are missing.
//
// One block of one warp per rank: lane i handles peers i, i+32, ... Runs unchanged on a GPU
// (cuda_runtime.cu) and on the CPU through the SIMT layer (cpu_runtime.cpp).

#include <cstdint>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"

namespace epcomm::runtime {

inline constexpr int kPeerBarrierThreads = 32;

struct PeerBarrierStatus {
  int32_t timed_out;  // 0, or 1 once some lane gave up (written by the kernel, read by the host)
  int32_t unused;
};

struct PeerBarrierArgs {
  uint64_t* const* peer_flags;  // [num_ranks] every rank's flag slots, device-accessible
  uint64_t* own_flags;          // this rank's flag slots (peer_flags[rank])
  PeerBarrierStatus* status;    // host-readable after the kernel
  int rank;
  int num_ranks;
  uint64_t epoch;
  long long timeout_ticks;  // clock64() ticks to wait for all peers
};

EPCOMM_GLOBAL void peer_barrier_kernel(PeerBarrierArgs args) {
  int const lane = int(threadIdx.x);
  // Signal every peer
  for (int peer = lane; peer < args.num_ranks; peer += kPeerBarrierThreads)
    ptx::st_release_sys_global(args.peer_flags[peer] + args.rank, args.epoch);
  // Wait for every peer's signal
  long long const start = ptx::read_clock64();
  for (int peer = lane; peer < args.num_ranks; peer += kPeerBarrierThreads) {
    while (ptx::ld_acquire_sys_global(args.own_flags + peer) < args.epoch) {
      if (ptx::read_clock64() - start > args.timeout_ticks) {
        ptx::st_relaxed_sys_global(&args.status->timed_out, int32_t(1));
        return;
      }
    }
  }
}

}  // namespace epcomm::runtime
