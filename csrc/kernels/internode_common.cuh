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

// Nodes (bit n) that token `token` goes to: the OR over the ranks of each node.
EPCOMM_DEVICE uint32_t token_node_mask(bool const* is_token_in_rank, int token, int num_ranks, int num_nvl_ranks) {
  uint32_t mask = 0;
  bool const* row = is_token_in_rank + int64_t(token) * num_ranks;
  for (int d = 0; d < num_ranks; ++d)
    if (row[d]) mask |= 1u << (d / num_nvl_ranks);
  return mask;
}

// Local ranks (bit p) of node `node` that token `token` goes to.
EPCOMM_DEVICE uint32_t token_peer_mask(bool const* is_token_in_rank, int token, int num_ranks, int num_nvl_ranks,
                                       int node) {
  uint32_t mask = 0;
  bool const* row = is_token_in_rank + int64_t(token) * num_ranks + int64_t(node) * num_nvl_ranks;
  for (int p = 0; p < num_nvl_ranks; ++p)
    if (row[p]) mask |= 1u << p;
  return mask;
}

}  // namespace epcomm::kernels
