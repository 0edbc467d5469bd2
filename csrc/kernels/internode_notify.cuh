#pragma once
// internode_notify: two blocks per rank (kInternodeNotifyThreads threads): block 0 does the work,
// block 1's warp 0 is the abort watcher (internode_common.cuh).
//   1. reset this rank's NVL ring counters (as notify.cuh: no peer uses them
//      until it passed the barrier below)
//   2. per destination rank d, this rank's counts (exchange_counts) and call header (a call
//      check, call_flags >= 0; call_check.cuh):
//        d on this node:     counts (d != self) and header written into d's NVL buffer
//        d == self:          counts written into this rank's own RDMA counts slot
//        d on another node:  the count message (rdma_workspace.cuh: header, then counts) staged,
//                            then put through the transport with barrier signal +1; only its
//                            16-byte header without counts; a bare signal +1 with neither
//   3. barrier: on the node, release-store this notify's epoch (epoch.cuh: counted on the device)
//      into every local peer's NVL barrier signal;
//      across nodes, step 2's signal added 1 to barrier[rank] of every remote rank. Then wait for
//      every source: NVL signal >= epoch (same node), transport barrier signal >= epoch (other nodes)
//   4. (exchange_counts) build recv_rank_prefix, recv_channel_prefix_matrix,
//      forward_channel_prefix_matrix and num_recv_tokens_per_expert; (call check) compare every
//      source's header into call_agreed.
//   5. (reset_signals, re-layout) zero this rank's transport signals and their bases, once the
//      adds still due to them have landed (internode_reset_own_signals).
// Counts and headers are double-buffered by epoch parity (a peer is at most one barrier ahead).

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "call_check.cuh"
#include "epoch.cuh"
#include "internode_common.cuh"
#include "prefix.cuh"

namespace epcomm::kernels {

// Lanes of one warp fill the counts for destination `dst`.
template <class Transport>
EPCOMM_DEVICE void internode_fill_count_message(InternodeNotifyArgs<Transport> const& args, int dst,
                                                int32_t* channel_counts, int32_t* node_counts,
                                                int32_t* expert_counts, int lane) {
  InternodeComm<Transport> const& comm = args.comm;
  int const num_channels = comm.config.nvl.num_channels, num_ranks = comm.num_ranks;
  int const dst_node = dst / comm.num_nvl_ranks;
  for (int channel = lane; channel < num_channels; channel += 32) {
    TokenRange const range = channel_token_range(args.num_tokens, num_channels, channel);
    int to_rank = 0, to_node = 0;
    for (int t = range.begin; t < range.end; ++t) {
      bool const* row = args.is_token_in_rank + int64_t(t) * num_ranks;
      to_rank += row[dst];
      bool in_node = false;
      for (int p = 0; p < comm.num_nvl_ranks; ++p) in_node = in_node || row[dst_node * comm.num_nvl_ranks + p];
      to_node += in_node;
    }
    channel_counts[channel] = to_rank;
    if (node_counts != nullptr) node_counts[channel] = to_node;
  }
  int const num_local_experts = comm.rdma_workspace.num_local_experts;
  for (int expert = lane; expert < num_local_experts; expert += 32)
    expert_counts[expert] =
        args.num_tokens_per_expert != nullptr ? args.num_tokens_per_expert[dst * num_local_experts + expert] : 0;
}

// Step 2 (and, for remote ranks, the network half of step 3's signal: exactly +1 per notify).
template <class Transport>
EPCOMM_DEVICE void internode_send_messages(InternodeNotifyArgs<Transport> const& args, int64_t epoch) {
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  NvlWorkspace const& nvl = comm.nvl_workspace;
  int const lane = int(ptx::get_lane_id()), warp = int(threadIdx.x) / 32, num_warps = int(blockDim.x) / 32;
  int const num_channels = comm.config.nvl.num_channels;
  bool const check_call = args.call_flags != kNoCallCheck;
  CallHeader const header = make_call_header(args.call_digest, args.call_flags, epoch);
  int const parity = epoch_parity(epoch);
  char* const local = comm.transport.local_buffer();
  for (int dst = warp; dst < comm.num_ranks; dst += num_warps) {
    if (dst / comm.num_nvl_ranks == comm.node()) {
      // This node (self included): straight into the NVL buffer; own counts go to the own RDMA slot
      void* const peer_buffer = comm.nvl_peer_buffers[dst % comm.num_nvl_ranks];
      if (check_call && lane == 0) *nvl.call_header(peer_buffer, parity, comm.local_rank()) = header;
      if (!args.exchange_counts) continue;
      if (dst == comm.rank) {
        int32_t* counts = RdmaWorkspace::message_counts(local + rdma.count_message_offset(parity, comm.rank));
        internode_fill_count_message(args, dst, counts, counts + num_channels, counts + 2 * num_channels, lane);
      } else {
        internode_fill_count_message(args, dst, nvl.channel_counts(peer_buffer, parity, comm.local_rank()), nullptr,
                                     nvl.expert_counts(peer_buffer, parity, comm.local_rank()), lane);
      }
      continue;
    }
    // Another node: stage the message, then one put with the barrier signal (or the bare signal)
    if (!args.exchange_counts && !check_call) {
      comm.transport.signal_add(WarpCoop{lane}, dst, rdma.barrier_signal(comm.rank), 1);
      continue;
    }
    char* const message = local + rdma.count_staging_message_offset(dst);
    if (check_call && lane == 0) *RdmaWorkspace::message_call_header(message) = header;
    if (args.exchange_counts) {
      int32_t* counts = RdmaWorkspace::message_counts(message);
      internode_fill_count_message(args, dst, counts, counts + num_channels, counts + 2 * num_channels, lane);
    }
    ptx::syncwarp();  // every lane's part of the message is written before any lane copies it
    comm.transport.put_signal(WarpCoop{lane}, dst, rdma.count_message_offset(parity, comm.rank),
                              rdma.count_staging_message_offset(dst),
                              args.exchange_counts ? rdma.count_message_bytes() : sizeof(CallHeader),
                              rdma.barrier_signal(comm.rank), 1);
  }
  comm.transport.flush(WarpCoop{lane});
}

// Step 3. Returns false (in every thread) when a rank never arrived.
template <class Transport>
EPCOMM_DEVICE bool internode_barrier(InternodeNotifyArgs<Transport> const& args, int64_t epoch) {
  __shared__ int failed;
  InternodeComm<Transport> const& comm = args.comm;
  if (threadIdx.x == 0) failed = 0;
  // Publish on the node: everything this block wrote (counters reset, counts) happens-before the signal
  __syncthreads();
  int const local = comm.local_rank();
  for (int peer = int(threadIdx.x); peer < comm.num_nvl_ranks; peer += int(blockDim.x))
    ptx::st_release_sys_global(comm.nvl_workspace.barrier_signal(comm.nvl_peer_buffers[peer], local), epoch);
  // Wait for every source
  for (int src = int(threadIdx.x); src < comm.num_ranks; src += int(blockDim.x)) {
    WaitContext const context =
        internode_wait_context(comm, KernelId::kInternodeNotify, Role::kInternodeNotifyBarrier, -1, src);
    bool ok;
    if (src / comm.num_nvl_ranks == comm.node()) {
      int64_t const* signal = comm.nvl_workspace.barrier_signal(comm.nvl_peer_buffers[local], src % comm.num_nvl_ranks);
      ok = wait_at_least(context, epoch, [&] { return ptx::ld_acquire_sys_global(signal); }, nullptr);
    } else {
      int const signal = comm.rdma_workspace.barrier_signal(src);
      ok = wait_at_least(context, epoch, [&] { return int64_t(comm.transport.read_signal(signal)); }, nullptr);
    }
    if (!ok) atomicOr(&failed, 1);
  }
  __syncthreads();
  return failed == 0;
}

// Where source `src`'s message to this rank landed: channel counts, node counts (null on this node
// except self) and expert counts.
struct ReceivedCounts {
  int32_t const* channel_counts;
  int32_t const* node_counts;
  int32_t const* expert_counts;
};

template <class Transport>
EPCOMM_DEVICE ReceivedCounts internode_received_counts(InternodeComm<Transport> const& comm, int parity,
                                                                  int src) {
  int const num_channels = comm.config.nvl.num_channels;
  if (src != comm.rank && src / comm.num_nvl_ranks == comm.node()) {
    void* const own = comm.nvl_peer_buffers[comm.local_rank()];
    int const src_local = src % comm.num_nvl_ranks;
    return {comm.nvl_workspace.channel_counts(own, parity, src_local), nullptr,
            comm.nvl_workspace.expert_counts(own, parity, src_local)};
  }
  int32_t const* counts =
      RdmaWorkspace::message_counts(comm.transport.local_buffer() + comm.rdma_workspace.count_message_offset(parity, src));
  return {counts, counts + num_channels, counts + 2 * num_channels};
}

// Where source `src`'s call header to this rank landed (its NVL slot on this node, else its message).
template <class Transport>
EPCOMM_DEVICE CallHeader const* internode_received_call_header(InternodeComm<Transport> const& comm, int parity,
                                                               int src) {
  if (src / comm.num_nvl_ranks == comm.node())
    return comm.nvl_workspace.call_header(comm.nvl_peer_buffers[comm.local_rank()], parity, src % comm.num_nvl_ranks);
  return RdmaWorkspace::message_call_header(comm.transport.local_buffer() +
                                            comm.rdma_workspace.count_message_offset(parity, src));
}

// Step 4.
template <class Transport>
EPCOMM_DEVICE void internode_build_prefixes(InternodeNotifyArgs<Transport> const& args, int parity) {
  InternodeComm<Transport> const& comm = args.comm;
  int const num_channels = comm.config.nvl.num_channels;
  if (threadIdx.x == 0) {
    // Received rows: by source rank, then channel
    build_channel_prefix(
        comm.num_ranks, num_channels, [&](int src) { return internode_received_counts(comm, parity, src).channel_counts; },
        args.recv_channel_prefix_matrix, args.recv_rank_prefix);
  } else if (threadIdx.x == 32) {
    // Forwarded rows: by source node (its rank with this local index), then channel
    auto const forwarded_counts = [&](int node) {
      return internode_received_counts(comm, parity, node * comm.num_nvl_ranks + comm.local_rank()).node_counts;
    };
    build_channel_prefix(comm.num_nodes(), num_channels, forwarded_counts, args.forward_channel_prefix_matrix,
                         static_cast<int32_t*>(nullptr));
  }
  if (args.num_recv_tokens_per_expert == nullptr) return;
  sum_expert_counts(comm.rdma_workspace.num_local_experts, comm.num_ranks, args.expert_alignment,
                    [&](int src) { return internode_received_counts(comm, parity, src).expert_counts; },
                    args.num_recv_tokens_per_expert);
}

// Step 5. Signals count of all time and may outlive the buffer's contents (GIN keeps them in the
// communicator, where zeroing the buffer does not reach), while a new layout starts its epochs and
// ring bases at 0 and moves the ring signals' indices with the channel count. So a re-layout zeroes
// every signal of this rank explicitly. The barrier just passed means no rank still runs a kernel of
// the old layout, but adds a network transport delivers after the issuing kernel ended may still be
// on their way (the last ring credits). Each signal is first waited up to the value its owner knows
// it ends at: barrier[s] = epoch for a source on another node (one add per notify; same-node
// sources meet in NVL memory: 0), a ring signal its base (the rows of all time the kernels counted),
// the abort signal 0 (a raised one was reported by the watcher; it is cleared with the rest).
template <class Transport>
EPCOMM_DEVICE void internode_reset_own_signals(InternodeNotifyArgs<Transport> const& args, int64_t epoch) {
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  char* const local = comm.transport.local_buffer();
  for (int signal = int(threadIdx.x); signal < rdma.num_signals(); signal += int(blockDim.x)) {
    bool const barrier = signal < comm.num_ranks;
    // whom the wait is on (for the error): a barrier signal's source; a ring signal's (kind, channel, node)
    // peer is that node's rank with this local index
    int const ring = signal - comm.num_ranks, num_nodes = comm.num_nodes();
    int const channel = barrier || signal == rdma.abort_signal() ? -1 : (ring / num_nodes) % rdma.num_channels;
    int const peer = barrier ? signal : channel < 0 ? -1 : (ring % num_nodes) * comm.num_nvl_ranks + comm.local_rank();
    uint64_t expected = 0;
    if (barrier)
      expected = signal / comm.num_nvl_ranks == comm.node() ? 0 : uint64_t(epoch);
    else if (signal != rdma.abort_signal())
      expected = *rdma.signal_base(local, signal);
    WaitContext const context =
        internode_wait_context(comm, KernelId::kInternodeNotify, Role::kSignalReset, channel, peer);
    if (!wait_at_least(context, int64_t(expected), [&] { return int64_t(comm.transport.read_signal(signal)); },
                       nullptr))
      continue;  // reported (timeout naming the signal's peer, or an abort); the buffers are then broken
    comm.transport.reset_signal(signal);
    *rdma.signal_base(local, signal) = 0;
  }
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kInternodeNotifyThreads, 1) internode_notify_kernel(InternodeNotifyArgs<Transport> args) {
  InternodeComm<Transport> const& comm = args.comm;
  if (blockIdx.x == 1) {
    // The second block: warp 0 is the abort watcher, the others only count themselves
    if (threadIdx.x < 32) return internode_abort_watcher(comm);
    return internode_warp_finished(comm);
  }
  void* const own_nvl = comm.nvl_peer_buffers[comm.local_rank()];
  int64_t const epoch = advance_epoch(comm.nvl_workspace.epoch_counter(own_nvl));
  int const parity = epoch_parity(epoch);
  // Reset this rank's NVL ring counters
  for (int i = int(threadIdx.x); i < comm.nvl_workspace.num_ring_counters(); i += int(blockDim.x)) {
    comm.nvl_workspace.ring_head(own_nvl, 0, 0)[i] = 0;
    comm.nvl_workspace.ring_tail(own_nvl, 0, 0)[i] = 0;
  }
  internode_send_messages(args, epoch);
  if (internode_barrier(args, epoch)) {
    if (args.call_flags != kNoCallCheck && threadIdx.x == 0)
      judge_call(comm.num_ranks, args.call_digest, epoch,
                 [&](int src) { return internode_received_call_header(comm, parity, src); }, args.call_agreed,
                 args.call_mismatch);
    if (args.exchange_counts) internode_build_prefixes(args, parity);
    if (args.reset_signals) internode_reset_own_signals(args, epoch);
  }
  internode_warp_finished(comm);
}

}  // namespace epcomm::kernels
