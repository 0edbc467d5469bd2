#pragma once
// Device pieces shared by the internode kernels: who is waiting (for the error
// report) and warp-level waits on transport signals.

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "internode.hpp"

namespace epcomm::kernels {

// Waits for free slots ("credit") use timeout_cycles; waits for data use twice that: when a credit
// return is stuck, the starved producer reports (naming its role and peer) before the consumers
// downstream of it, whose waits are only a symptom.
template <class Transport>
EPCOMM_DEVICE WaitContext internode_wait_context(InternodeComm<Transport> const& comm, KernelId kernel, Role role,
                                                 int channel, int peer) {
  WaitContext context{comm.error,    comm.nvl_peer_buffers, comm.nvl_workspace.abort_flag_offset,
                      comm.num_nvl_ranks, comm.rank,         kernel,
                      role,          channel,               peer,
                      comm.timeout_cycles};
  context.own_index = comm.local_rank();
  return context;
}

template <class Transport>
EPCOMM_DEVICE WaitContext internode_data_wait_context(InternodeComm<Transport> const& comm, KernelId kernel, Role role,
                                                      int channel, int peer) {
  WaitContext context = internode_wait_context(comm, kernel, role, channel, peer);
  context.timeout_cycles = 2 * comm.timeout_cycles;
  return context;
}

// Lane 0 waits for this rank's signal `signal` >= expected (acquire); every lane gets the outcome and
// the value seen. The trailing syncwarp orders lane 0's acquire before the whole warp's reads.
template <class Transport>
EPCOMM_DEVICE bool warp_wait_signal(WaitContext const& context, Transport const& transport, int signal,
                                    uint64_t expected, int lane, uint64_t* observed) {
  int64_t value = 0;
  int ok = 1;
  if (lane == 0)
    ok = wait_at_least(context, int64_t(expected), [&] { return int64_t(transport.read_signal(signal)); }, &value)
             ? 1
             : 0;
  ok = ptx::shfl_sync(kFullWarpMask, ok, 0);
  *observed = uint64_t(ptx::shfl_sync(kFullWarpMask, value, 0));
  ptx::syncwarp();
  return ok != 0;
}

// Abort propagation across nodes. A failing rank raises the NVL abort flags of its node
// (error.cuh); one warp per rank and kernel, the watcher, carries it over the network:
//   - own NVL abort flag raised (a failure on this node): signal_add the abort signal of every
//     rank on other nodes (once);
//   - own abort signal raised (a failure on another node): raise the own NVL abort flag, which
//     ends every wait of this rank with kPeerAborted.
// The watcher leaves once every other warp of the grid called internode_warp_finished, then
// resets the count for the next kernel. After any failure, the buffers must be re-created.
template <class Transport>
EPCOMM_DEVICE void internode_warp_finished(InternodeComm<Transport> const& comm) {
  ptx::syncwarp();
  // Release: the watcher that counts this warp also sees the abort flag it may have raised
  if (ptx::get_lane_id() == 0)
    ptx::atomic_add_release_sys_global(comm.rdma_workspace.finished_warps(comm.transport.local_buffer()), int32_t(1));
}

template <class Transport>
EPCOMM_DEVICE void internode_abort_watcher(InternodeComm<Transport> const& comm) {
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  Transport const& transport = comm.transport;
  int const lane = int(ptx::get_lane_id());
  int32_t* const own_flag = comm.nvl_workspace.abort_flag(comm.nvl_peer_buffers[comm.local_rank()]);
  int32_t* const finished = rdma.finished_warps(transport.local_buffer());
  int const num_other_warps = int(gridDim.x) * int(blockDim.x) / 32 - 1;
  bool forwarded = false, raised = false;
  for (;;) {
    int state = 0;  // bit 0: all others finished; bit 1: local abort; bit 2: network abort
    if (lane == 0) {
      state |= ptx::ld_acquire_sys_global(finished) >= num_other_warps ? 1 : 0;
      state |= ptx::ld_relaxed_sys_global(own_flag) != 0 ? 2 : 0;
      state |= transport.read_signal(rdma.abort_signal()) != 0 ? 4 : 0;
    }
    state = ptx::shfl_sync(kFullWarpMask, state, 0);
    if ((state & 4) != 0 && !raised) {
      // Another node failed: stop this rank's waits
      if (lane == 0) ptx::st_release_sys_global(own_flag, int32_t(1));
      raised = true;
      forwarded = true;  // every rank of the failing node already told every other node
    }
    if ((state & 2) != 0 && !forwarded) {
      // This node failed: tell every rank of every other node
      for (int peer = 0; peer < comm.num_ranks; ++peer)
        if (peer / comm.num_nvl_ranks != comm.node()) transport.signal_add(WarpCoop{lane}, peer, rdma.abort_signal(), 1);
      forwarded = true;
    }
    if ((state & 1) != 0) break;
  }
  if (lane == 0) ptx::st_relaxed_sys_global(finished, int32_t(0));
}

}  // namespace epcomm::kernels
