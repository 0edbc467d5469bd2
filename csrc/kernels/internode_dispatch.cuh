#pragma once
// internode_dispatch: two hops. Channel c is three blocks of 32 x internode_block_warps threads:
//   3c      network senders: warp n sends the channel's tokens that node n needs, in token order,
//           into network ring (c, this node) of rank (n, this local rank) -- the forwarder --
//           through the transport: rows are staged one by one and put a chunk at a time (put_signal:
//           staged run -> ring slots, tail signal += its rows; a run ends at rdma_chunk_tokens rows, at
//           the ring's end, before waiting for free slots, and after the last token).
//           Own node included (a put to self). Free slots: the head signal the coordinator returns.
//   3c + 1  forwarders: warp p < L reads the network rings (c, m) for source nodes m = 0, 1, ... in
//           order and copies every row peer p needs into p's NVL ring (c, this local rank)
//           (RingSender, channel.cuh), publishing its progress; warp L, the coordinator, returns
//           network slots to each sender (signal_add on its head) once every forwarder warp passed them.
//   3c + 2  NVL receivers: warp f drains NVL ring (c, f): rows of source rank (m, f) for m = 0, 1, ...,
//           each in token order, land at rows prefix[(m, f)][c] + i (notify's matrix).
//           Block 2 (channel 0), warp L: the abort watcher (internode_common.cuh).
// Network rings: rdma_workspace.cuh (signals only grow; row i of all time is slot i % T).
// Ordering: put_signal is a strong signal (bytes visible to whoever sees the add); forwarder warps
// release-store their progress, the coordinator acquires it before freeing slots.
//
// Planted bugs (build flags) that the checks must catch:
//   EPCOMM_PLANT_FORWARDER_RELAXED_TAIL   forwarders publish NVL tails relaxed (TSAN reports a race)
//   EPCOMM_PLANT_COORDINATOR_NO_RETURN    the coordinator never returns network slots (network_sender timeout)

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "internode_common.cuh"
#include "network_ring.cuh"
#include "ring_rows.cuh"

namespace epcomm::kernels {

// This rank as forwarder: the rows of (source node `node`, channel `channel`) -- where they start
// in forward_peer_masks and how many (notify's forward_channel_prefix_matrix).
struct ForwardRange {
  int first_row, num_rows;
};

EPCOMM_DEVICE ForwardRange forward_range(int32_t const* forward_prefix, int num_channels, int node, int channel) {
  int32_t const* prefix = forward_prefix + int64_t(node) * (num_channels + 1);
  return {prefix[channel], prefix[channel + 1] - prefix[channel]};
}

// Lanes stage token `token`'s record and row in staging slot `staging`.
template <class Transport>
EPCOMM_DEVICE void network_stage_row(InternodeDispatchArgs<Transport> const& args, char* staging, int token,
                                     uint32_t peer_mask, int lane) {
  RdmaWorkspace const& rdma = args.comm.rdma_workspace;
  if (lane == 0) {
    *RdmaWorkspace::record_src_idx(staging) = token;
    *RdmaWorkspace::record_peer_mask(staging) = peer_mask;
  }
  for (int k = lane; k < args.num_topk; k += 32) {
    RdmaWorkspace::record_topk_idx(staging)[k] = args.topk_idx[int64_t(token) * args.num_topk + k];
    rdma.record_topk_weights(staging)[k] =
        args.topk_weights != nullptr ? args.topk_weights[int64_t(token) * args.num_topk + k] : 0.0f;
  }
  char* row = rdma.record_row(staging);
  warp_copy_words_rolled(reinterpret_cast<int32_t*>(row),
                  static_cast<int32_t const*>(args.x) + int64_t(token) * (args.hidden_bytes / 4), args.hidden_bytes / 4,
                  lane);
  if (args.scale_bytes > 0)
    warp_copy_words_rolled(reinterpret_cast<int32_t*>(row + args.hidden_bytes),
                    static_cast<int32_t const*>(args.x_scales) + int64_t(token) * (args.scale_bytes / 4),
                    args.scale_bytes / 4, lane);
}

// Lanes count the nodes `token` goes to; false (after reporting) when it exceeds max_nodes_per_token.
template <class Transport>
EPCOMM_DEVICE bool network_check_routing(InternodeDispatchArgs<Transport> const& args, int token, int channel, int lane) {
  InternodeComm<Transport> const& comm = args.comm;
  bool in_node = false;
  if (lane < comm.num_nodes())
    for (int p = 0; p < comm.num_nvl_ranks; ++p)
      in_node = in_node || args.is_token_in_rank[int64_t(token) * comm.num_ranks + lane * comm.num_nvl_ranks + p];
  int const num_nodes = __popc(ptx::ballot_sync(kFullWarpMask, in_node));
  if (num_nodes <= args.max_nodes_per_token) return true;
  if (lane == 0) {
    WaitContext const context =
        internode_wait_context(comm, KernelId::kInternodeDispatch, Role::kNetworkSender, channel, -1);
    report_failure(context, ErrorCode::kBadRouting, args.max_nodes_per_token, num_nodes);
  }
  return false;
}

// Sends the channel's tokens that node `node` needs to the forwarder there.
template <class Transport>
EPCOMM_DEVICE void network_sender(InternodeDispatchArgs<Transport> const& args, int channel, int node) {
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  Transport const& transport = comm.transport;
  int const lane = int(ptx::get_lane_id());
  int const forwarder = node * comm.num_nvl_ranks + comm.local_rank();
  char* const local = transport.local_buffer();
  int const tail_signal = rdma.dispatch_tail_signal(channel, comm.node());
  NetworkRingSender<Transport> ring(transport, rdma, rdma.dispatch_head_signal(channel, node),
                                    comm.config.rdma_ring_tokens);
  int const row_bytes = args.hidden_bytes + args.scale_bytes;
  size_t const stride = rdma.dispatch_stride(row_bytes), put_bytes = rdma.dispatch_put_bytes(row_bytes);
  // Rows that pack exactly (stride == put bytes) travel in runs of up to a chunk; others one per put
  int const max_run = stride == put_bytes ? comm.config.rdma_chunk_tokens : 1;
  uint64_t run_first = ring.sent;  // rows [run_first, ring.sent) are staged, not yet put
  auto const put_run = [&] {
    if (ring.sent == run_first) return;
    put_ring_run(transport, lane, forwarder, rdma.dispatch_ring_slot(channel, comm.node(), run_first, stride),
                 rdma.dispatch_staging_slot(channel, node, run_first, stride), int(ring.sent - run_first), stride,
                 put_bytes, tail_signal);
    run_first = ring.sent;
  };

  TokenRange const range = channel_token_range(args.num_tokens, comm.config.nvl.num_channels, channel);
  for (int token = range.begin; token < range.end; ++token) {
    // A token beyond the routing bound stops every sender warp there (no node gets part of it)
    if (!network_check_routing(args, token, channel, lane)) return;
    // Which ranks of `node` need the token
    bool const needed =
        lane < comm.num_nvl_ranks && args.is_token_in_rank[int64_t(token) * comm.num_ranks + node * comm.num_nvl_ranks + lane];
    uint32_t const peer_mask = ptx::ballot_sync(kFullWarpMask, needed);
    if (peer_mask == 0) continue;
    // A free slot (waiting, when there is none, for a chunk of them; the staged rows go first, as the
    // forwarder frees slots only for rows it has received)
    if (!ring.has_room(1)) put_run();
    if (!ring.reserve(internode_wait_context(comm, KernelId::kInternodeDispatch, Role::kNetworkSender, channel, forwarder),
                      transport, 1, comm.config.rdma_chunk_tokens, lane))
      return;
    // Stage the record and row; the run goes out when it is a chunk or reaches the ring's end
    network_stage_row(args, local + rdma.dispatch_staging_slot(channel, node, ring.sent, stride), token, peer_mask,
                      lane);
    ring.advance(1);
    int const staged = int(ring.sent - run_first);
    if (staged == max_run || staged == ring.rows_to_wrap(run_first)) put_run();
  }
  put_run();
  transport.flush(WarpCoop{lane});
  ring.save(lane);  // the next kernel continues this ring's row count from here
}

// Copies network slot `slot` (a row from source node `src_node`) into NVL slot `nvl_slot`.
template <class Transport>
EPCOMM_DEVICE void forward_row(InternodeDispatchArgs<Transport> const& args, char* slot, char* nvl_slot, int src_node,
                               int lane) {
  RdmaWorkspace const& rdma = args.comm.rdma_workspace;
  NvlWorkspace const& nvl = args.comm.nvl_workspace;
  warp_copy_words_rolled(reinterpret_cast<int32_t*>(nvl_slot), reinterpret_cast<int32_t const*>(rdma.record_row(slot)),
                  (args.hidden_bytes + args.scale_bytes) / 4, lane);
  if (lane == 0) {
    *nvl.slot_src_idx(nvl_slot) = *RdmaWorkspace::record_src_idx(slot);
    *nvl.slot_aux(nvl_slot) = src_node;
  }
  for (int k = lane; k < args.num_topk; k += 32) {
    nvl.slot_topk_idx(nvl_slot)[k] = RdmaWorkspace::record_topk_idx(slot)[k];
    nvl.slot_topk_weights(nvl_slot)[k] = rdma.record_topk_weights(slot)[k];
  }
}

// Forwards the rows peer `peer` of this node needs, from every source node in order.
template <class Transport>
EPCOMM_DEVICE void forwarder(InternodeDispatchArgs<Transport> const& args, int channel, int peer) {
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  NvlWorkspace const& nvl = comm.nvl_workspace;
  Transport const& transport = comm.transport;
  int const lane = int(ptx::get_lane_id());
  int const num_channels = comm.config.nvl.num_channels;
  char* const local = transport.local_buffer();
  void* const peer_buffer = comm.nvl_peer_buffers[peer];
  RingSender ring(nvl.ring_head(peer_buffer, channel, comm.local_rank()),
                  nvl.ring_tail(peer_buffer, channel, comm.local_rank()), comm.config.nvl);
#if defined(EPCOMM_PLANT_FORWARDER_RELAXED_TAIL)
  ring.planted_relaxed_tail = true;
#endif
  int32_t* const progress = rdma.forwarder_progress(local, channel, peer);
  size_t const stride = rdma.dispatch_stride(args.hidden_bytes + args.scale_bytes);  // the senders'
  int passed = 0;  // network rows of this channel passed, m-major

  for (int src_node = 0; src_node < comm.num_nodes(); ++src_node) {
    ForwardRange const rows = forward_range(args.forward_channel_prefix_matrix, num_channels, src_node, channel);
    int const src = src_node * comm.num_nvl_ranks + comm.local_rank();
    if (rows.num_rows == 0) continue;
    int const tail_signal = rdma.dispatch_tail_signal(channel, src_node);
    uint64_t const base = *rdma.signal_base(local, tail_signal);
    int received = 0;
    while (received < rows.num_rows) {
      // Let peer `peer` drain what is written, then wait for network rows
      ring.publish(lane);
      uint64_t tail = 0;
      if (!warp_wait_signal(internode_data_wait_context(comm, KernelId::kInternodeDispatch, Role::kForwarder, channel, src),
                            transport, tail_signal, base + received + 1, lane, &tail))
        return;
      int const end = min_int(int(tail - base), rows.num_rows);
      for (; received < end; ++received) {
        char* slot = local + rdma.dispatch_ring_slot(channel, src_node, base + received, stride);
        uint32_t const mask = *RdmaWorkspace::record_peer_mask(slot);
        if (peer == 0 && lane == 0 && args.forward_peer_masks != nullptr)
          args.forward_peer_masks[rows.first_row + received] = mask;
        if ((mask >> peer & 1u) == 0) continue;
        if (!ring.reserve(internode_wait_context(comm, KernelId::kInternodeDispatch, Role::kForwarder, channel,
                                                 comm.node() * comm.num_nvl_ranks + peer),
                          lane))
          return;
        forward_row(args, slot, nvl.slot(peer_buffer, channel, comm.local_rank(), ring.sent), src_node, lane);
        ring.commit(lane);
      }
      // Tell the coordinator these network slots were read
      ptx::syncwarp();
      if (lane == 0) ptx::st_release_sys_global(progress, int32_t(passed + received));
    }
    passed += rows.num_rows;
  }
  ring.publish(lane);
}

// Returns network slots to every source node's sender once all forwarder warps passed them.
// Lane m (< num_nodes) owns ring (c, m): `returned` rows given back so far.
template <class Transport>
EPCOMM_DEVICE void forwarder_coordinator(InternodeDispatchArgs<Transport> const& args, int channel) {
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  Transport const& transport = comm.transport;
  int const lane = int(ptx::get_lane_id());
  int const num_channels = comm.config.nvl.num_channels, num_nodes = comm.num_nodes();
  char* const local = transport.local_buffer();

  // Lane m: where ring m's rows sit in the m-major order, and the total
  int offset = 0, total = 0, num_rows = 0;
  for (int node = 0; node < num_nodes; ++node) {
    int const n = forward_range(args.forward_channel_prefix_matrix, num_channels, node, channel).num_rows;
    if (node < lane) offset += n;
    if (node == lane) num_rows = n;
    total += n;
  }
  int returned = 0, passed_by_all = 0;
  while (passed_by_all < total) {
    // Wait until every forwarder warp passed more rows
    int64_t observed = 0;
    int ok = 1;
    if (lane == 0) {
      WaitContext const context =
          internode_data_wait_context(comm, KernelId::kInternodeDispatch, Role::kForwarderCoordinator, channel, -1);
      ok = wait_at_least(context, passed_by_all + 1, [&] {
             int32_t least = total;
             for (int peer = 0; peer < comm.num_nvl_ranks; ++peer)
               least = min_int(least, ptx::ld_acquire_sys_global(rdma.forwarder_progress(local, channel, peer)));
             return least;
           }, &observed) ? 1 : 0;
    }
    ok = ptx::shfl_sync(kFullWarpMask, ok, 0);
    passed_by_all = ptx::shfl_sync(kFullWarpMask, int(observed), 0);
    ptx::syncwarp();
    if (ok == 0) return;
    // Give back what every warp passed, ring by ring
    int const freed = lane < num_nodes ? min_int(num_rows, passed_by_all - offset > 0 ? passed_by_all - offset : 0) : 0;
    uint32_t pending = ptx::ballot_sync(kFullWarpMask, freed > returned);
    while (pending != 0) {
      int const node = __ffs(int(pending)) - 1;
      pending &= pending - 1;
      int const add = ptx::shfl_sync(kFullWarpMask, freed - returned, node);
#if !defined(EPCOMM_PLANT_COORDINATOR_NO_RETURN)
      transport.signal_add(WarpCoop{lane}, node * comm.num_nvl_ranks + comm.local_rank(), rdma.dispatch_head_signal(channel, comm.node()),
                           uint64_t(add));
#else
      (void)add;
#endif
    }
    if (freed > returned) returned = freed;
  }
  // Every row is passed: record the rings' totals, reset the progress for the next kernel
  if (lane < num_nodes && num_rows > 0) *rdma.signal_base(local, rdma.dispatch_tail_signal(channel, lane)) += uint64_t(num_rows);
  if (lane < comm.num_nvl_ranks) *rdma.forwarder_progress(local, channel, lane) = 0;
}

// Where the receivers store rows (built at each use: the fields stay in parameter space).
template <class Transport>
EPCOMM_DEVICE ReceivedRowOutputs received_row_outputs(InternodeDispatchArgs<Transport> const& args) {
  // num_experts is only meaningful with topk_idx (num_topk > 0)
  int64_t const num_local_experts =
      args.num_topk > 0 ? uniform_num_local_experts(args.num_experts, args.comm.num_ranks) : 0;
  return {args.recv_x,       args.recv_x_scales, args.recv_topk_idx, args.recv_topk_weights,
          args.recv_src_idx, args.hidden_bytes,  args.scale_bytes,   args.num_topk,
          args.comm.rank,    num_local_experts};
}

// Places the rows forwarder `fwd` of this node sends on `channel`: source nodes in order.
template <class Transport>
EPCOMM_DEVICE void nvl_receiver(InternodeDispatchArgs<Transport> const& args, int channel, int fwd) {
  InternodeComm<Transport> const& comm = args.comm;
  NvlWorkspace const& nvl = comm.nvl_workspace;
  int const lane = int(ptx::get_lane_id());
  int const num_channels = comm.config.nvl.num_channels;
  void* const own_buffer = comm.nvl_peer_buffers[comm.local_rank()];
  int32_t* head = nvl.ring_head(own_buffer, channel, fwd);
  int32_t const* tail = nvl.ring_tail(own_buffer, channel, fwd);
  int received = 0;  // rows of the ring so far
  for (int src_node = 0; src_node < comm.num_nodes(); ++src_node) {
    int32_t const* prefix =
        args.recv_channel_prefix_matrix + int64_t(src_node * comm.num_nvl_ranks + fwd) * (num_channels + 1);
    int const first_row = prefix[channel], num_rows = prefix[channel + 1] - prefix[channel];
    int const ring_begin = received;
    while (received - ring_begin < num_rows) {
      // Wait for rows, place them, free the slots
      int tail_value = 0;
      if (!warp_wait_at_least(internode_data_wait_context(comm, KernelId::kInternodeDispatch, Role::kNvlReceiver, channel,
                                                     comm.node() * comm.num_nvl_ranks + fwd),
                              tail, received + 1, lane, &tail_value))
        return;
      int const end = min_int(tail_value, ring_begin + num_rows);
      for (; received < end; ++received)
        store_received_row<CopyStyle::kWordsRolled>(received_row_outputs(args), nvl, nvl.slot(own_buffer, channel, fwd, received), first_row + (received - ring_begin),
                           lane);
      ptx::syncwarp();
      if (lane == 0) ptx::st_release_sys_global(head, int32_t(received));
    }
  }
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(32 * max_block_warps<Transport>(), 1)
    internode_dispatch_kernel(InternodeDispatchArgs<Transport> args) {
  // the notify before it rejected this call (call_check.cuh): nothing moves on any rank
  if (call_rejected(args.call_verdict))
    return report_call_rejected(internode_wait_context(args.comm, KernelId::kInternodeDispatch, Role::kCallGate, -1, -1), args.call_verdict);
  int const channel = int(blockIdx.x) / kInternodeBlocksPerChannel;
  int const role_block = int(blockIdx.x) % kInternodeBlocksPerChannel;
  int const warp = int(threadIdx.x) / 32;
  int const num_nvl_ranks = args.comm.num_nvl_ranks;
  if (role_block == 0) {
    if (warp < args.comm.num_nodes()) network_sender(args, channel, warp);
  } else if (role_block == 1) {
    if (warp < num_nvl_ranks) forwarder(args, channel, warp);
    else if (warp == num_nvl_ranks) forwarder_coordinator(args, channel);
  } else {
    if (warp < num_nvl_ranks) nvl_receiver(args, channel, warp);
    // Channel 0's receiver block has a spare warp (the block has >= L + 1): the abort watcher
    else if (warp == num_nvl_ranks && channel == 0) return internode_abort_watcher(args.comm);
  }
  internode_warp_finished(args.comm);
}

}  // namespace epcomm::kernels
