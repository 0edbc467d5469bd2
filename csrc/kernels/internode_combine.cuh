#pragma once
// internode_combine: the reverse of internode_dispatch. Channel c is three blocks:
//   3c      NVL senders: warp f sends this rank's rows that came through forwarder f (rows of
//           source ranks (m, f), m = 0, 1, ..., each in token order) into NVL ring (c, this local
//           rank) of rank f of this node (RingSender, channel.cuh).
//   3c + 1  forwarder (whole block): for source nodes m in order, for the tokens it forwarded from
//           rank (m, this local rank) on channel c (dispatch's forward_peer_masks), in batches:
//           warp 0's lane p waits for the rows of NVL ring (c, p); warp 1 waits for free network
//           slots; every thread reduces, per token and element, P = 0; P += float(row_p) for the
//           peers p holding the token, ascending; the partial row, rounded to node_partial_kind (the
//           rows' dtype, or fp32), and the fp32 weights are staged; the batch is put into network ring
//           (c, this node) of rank (m, this local rank) at once (two puts when it wraps the ring), tail
//           += its rows.
//   3c + 2  network receiver (whole block): for the channel's tokens in batches, warp 0's lane n
//           waits for the partials of network ring (c, n) of every node n the token reached; every
//           thread reduces acc = 0; acc += float(P_n) for n ascending; out = dtype(acc).
//           Then warp 0 returns the slots to each forwarding node (signal_add on its head).
// Block 0 (channel 0), warp L: the abort watcher (internode_common.cuh).
// Batch sizes (internode.hpp) keep every reducer from waiting on a row its producer cannot write.

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "elements.cuh"
#include "internode_common.cuh"
#include "internode_dispatch.cuh"
#include "network_ring.cuh"
#include "ordered_reduce.cuh"
#include "ring_rows.cuh"

namespace epcomm::kernels {

// Sends the rows that came through forwarder `fwd` back to it, source nodes in order.
template <class Transport>
EPCOMM_DEVICE void combine_nvl_sender(InternodeCombineArgs<Transport> const& args, int channel, int fwd) {
  InternodeComm<Transport> const& comm = args.comm;
  NvlWorkspace const& nvl = comm.nvl_workspace;
  int const lane = int(ptx::get_lane_id());
  int const num_channels = comm.config.nvl.num_channels;
  void* const fwd_buffer = comm.nvl_peer_buffers[fwd];
  WaitContext const context = internode_wait_context(comm, KernelId::kInternodeCombine, Role::kCombineNvlSender,
                                                     channel, comm.node() * comm.num_nvl_ranks + fwd);
  RingSender ring(nvl.ring_head(fwd_buffer, channel, comm.local_rank()),
                  nvl.ring_tail(fwd_buffer, channel, comm.local_rank()), comm.config.nvl);
  for (int src_node = 0; src_node < comm.num_nodes(); ++src_node) {
    int32_t const* prefix =
        args.recv_channel_prefix_matrix + int64_t(src_node * comm.num_nvl_ranks + fwd) * (num_channels + 1);
    for (int64_t row = prefix[channel]; row < prefix[channel + 1]; ++row) {
      if (!ring.reserve(context, lane)) return;
      write_combine_slot<CopyStyle::kWordsRolled>(nvl, nvl.slot(fwd_buffer, channel, comm.local_rank(), ring.sent), args.x, args.topk_weights,
                         row, args.hidden * element_bytes(args.element_kind), args.num_topk, lane);
      ring.commit(lane);
    }
  }
  ring.publish(lane);
}

// Reduces this node's rows of every token forwarded on `channel` into one partial per token and node.
template <class Transport>
EPCOMM_DEVICE void combine_forwarder(InternodeCombineArgs<Transport> const& args, int channel) {
  // NVL ring row holding batch token i's row from peer p, or -1 when p has no row of it
  __shared__ int ring_rows[kMaxCombineBatchTokens][kMaxNvlRanks];
  __shared__ int failed;
  InternodeComm<Transport> const& comm = args.comm;
  NvlWorkspace const& nvl = comm.nvl_workspace;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  Transport const& transport = comm.transport;
  int const thread = int(threadIdx.x), warp = thread / 32, lane = thread % 32;
  int const num_nvl_ranks = comm.num_nvl_ranks, num_channels = comm.config.nvl.num_channels;
  char* const local = transport.local_buffer();
  void* const own_nvl = comm.nvl_peer_buffers[comm.local_rank()];
  bool const is_ring_lane = thread < num_nvl_ranks;  // warp 0, lane p: NVL ring (channel, p)
  int const ring_peer = thread;
  int consumed = 0, needed = 0;  // ring lane: rows of its NVL ring consumed / needed so far
  int const batch_tokens = internode_forwarder_batch_tokens(comm.config);
  if (thread == 0) failed = 0;
  __syncthreads();

  for (int dst_node = 0; dst_node < comm.num_nodes(); ++dst_node) {
    ForwardRange const rows = forward_range(args.forward_channel_prefix_matrix, num_channels, dst_node, channel);
    if (rows.num_rows == 0) continue;
    int const dst = dst_node * num_nvl_ranks + comm.local_rank();
    // every thread follows the ring's count (staging slots); warp 1 waits for credits and puts
    NetworkRingSender<Transport> ring(transport, rdma, rdma.combine_head_signal(channel, dst_node),
                                      comm.config.rdma_ring_tokens);
    for (int batch_begin = 0; batch_begin < rows.num_rows; batch_begin += batch_tokens) {
      int const num_batch_tokens = min_int(batch_tokens, rows.num_rows - batch_begin);
      if (is_ring_lane) {
        // Which NVL rows of peer `ring_peer` the batch needs; wait until its tail covers them
        for (int i = 0; i < num_batch_tokens; ++i) {
          uint32_t const mask = args.forward_peer_masks[rows.first_row + batch_begin + i];
          ring_rows[i][ring_peer] = (mask >> ring_peer & 1u) != 0 ? needed++ : -1;
        }
        if (needed > consumed) {
          WaitContext const context = internode_data_wait_context(comm, KernelId::kInternodeCombine, Role::kCombineForwarder,
                                                                  channel, comm.node() * num_nvl_ranks + ring_peer);
          int32_t const* tail = nvl.ring_tail(own_nvl, channel, ring_peer);
          if (!wait_at_least(context, needed, [&] { return ptx::ld_acquire_sys_global(tail); }, nullptr))
            atomicOr(&failed, 1);
        }
      } else if (warp == 1) {
        // Free network slots for the whole batch
        WaitContext const context =
            internode_wait_context(comm, KernelId::kInternodeCombine, Role::kCombineForwarder, channel, dst);
        if (!ring.reserve(context, transport, num_batch_tokens, num_batch_tokens, lane) && lane == 0)
          atomicOr(&failed, 1);
      }
      __syncthreads();
      if (failed != 0) return;

      // Reduce: peers ascending, fp32 from +0.0, into the staged partial rows (rounded to the kind they
      // cross the network in). Weights travel when
      // num_topk > 0 (the same on every rank); this rank's own topk_weights may be null when it
      // received no rows, while its peers' rows still carry theirs.
      // recomputed from parameters at each use rather than held (the block is at its register cap)
      auto const stride = [&] { return rdma.combine_stride(element_bytes(args.node_partial_kind)); };
      auto const staged = [&](int i) {
        return local + rdma.combine_staging_slot(channel, dst_node, ring.sent + i, stride());
      };
      reduce_batch_in_order(
          ring_rows, num_batch_tokens, num_nvl_ranks, args.hidden,
          [&](int p, int row, int j) { return load_element(nvl.slot(own_nvl, channel, p, row), j, args.element_kind); },
          [&](int i, int j, float sum) { store_element(rdma.combine_partial(staged(i)), j, sum, args.node_partial_kind); });
      reduce_batch_in_order(
          ring_rows, num_batch_tokens, num_nvl_ranks, args.num_topk,
          [&](int p, int row, int k) { return nvl.slot_topk_weights(nvl.slot(own_nvl, channel, p, row))[k]; },
          [&](int i, int k, float sum) { RdmaWorkspace::combine_weights(staged(i))[k] = sum; });
      __syncthreads();

      // Put the partials (warp 1); free the NVL rows (warp 0)
      if (warp == 1) {
        for (int i = 0, run = 0; i < num_batch_tokens; i += run) {
          run = min_int(num_batch_tokens - i, ring.rows_to_wrap(ring.sent + i));
          put_ring_run(transport, lane, dst, rdma.combine_ring_slot(channel, comm.node(), ring.sent + i, stride()),
                       rdma.combine_staging_slot(channel, dst_node, ring.sent + i, stride()), run, stride(), stride(),
                       rdma.combine_tail_signal(channel, comm.node()));
        }
      }
      if (is_ring_lane && needed > consumed) {
        ptx::st_release_sys_global(nvl.ring_head(own_nvl, channel, ring_peer), int32_t(needed));
        consumed = needed;
      }
      ring.advance(num_batch_tokens);
    }
    if (warp == 1) ring.save(lane);  // the next kernel continues this network ring's row count from here
  }
  if (warp == 1) transport.flush(WarpCoop{lane});
}

// Reduces the partials of every node into the channel's combined tokens.
template <class Transport>
EPCOMM_DEVICE void combine_network_receiver(InternodeCombineArgs<Transport> const& args, int channel) {
  // network ring row (since this kernel began) holding batch token i's partial from node n, or -1
  __shared__ int ring_rows[kMaxCombineBatchTokens][kMaxNodes];
  __shared__ uint64_t ring_base[kMaxNodes];
  __shared__ int failed;
  InternodeComm<Transport> const& comm = args.comm;
  RdmaWorkspace const& rdma = comm.rdma_workspace;
  Transport const& transport = comm.transport;
  int const thread = int(threadIdx.x), lane = thread % 32;
  int const num_nodes = comm.num_nodes(), num_nvl_ranks = comm.num_nvl_ranks;
  char* const local = transport.local_buffer();
  bool const is_ring_lane = thread < num_nodes;  // warp 0, lane n: network ring (channel, n)
  int const ring_node = thread;
  int consumed = 0, needed = 0;
  if (thread == 0) failed = 0;
  if (is_ring_lane) ring_base[ring_node] = *rdma.signal_base(local, rdma.combine_tail_signal(channel, ring_node));
  __syncthreads();

  TokenRange const range = channel_token_range(args.num_tokens, comm.config.nvl.num_channels, channel);
  int const batch_tokens = internode_receiver_batch_tokens(comm.config);
  for (int batch_begin = range.begin; batch_begin < range.end; batch_begin += batch_tokens) {
    int const num_batch_tokens = min_int(batch_tokens, range.end - batch_begin);
    if (is_ring_lane) {
      // Which partials of node `ring_node` the batch needs; wait until the ring's tail covers them
      for (int i = 0; i < num_batch_tokens; ++i) {
        bool in_node = false;
        bool const* row = args.is_token_in_rank + int64_t(batch_begin + i) * comm.num_ranks + ring_node * num_nvl_ranks;
        for (int p = 0; p < num_nvl_ranks; ++p) in_node = in_node || row[p];
        ring_rows[i][ring_node] = in_node ? needed++ : -1;
      }
      if (needed > consumed) {
        WaitContext const context = internode_data_wait_context(comm, KernelId::kInternodeCombine, Role::kCombineNetworkReceiver,
                                                           channel, ring_node * num_nvl_ranks + comm.local_rank());
        int const signal = rdma.combine_tail_signal(channel, ring_node);
        int64_t const expected = int64_t(ring_base[ring_node]) + needed;
        if (!wait_at_least(context, expected, [&] { return int64_t(transport.read_signal(signal)); }, nullptr))
          atomicOr(&failed, 1);
      }
    }
    __syncthreads();
    if (failed != 0) return;

    // Reduce: nodes ascending, fp32 from +0.0, then one rounding to the rows' dtype
    auto const partial = [&](int n, int row) {  // at the forwarders' stride (recomputed: the register cap)
      return local + rdma.combine_ring_slot(channel, n, ring_base[n] + uint64_t(row),
                                            rdma.combine_stride(element_bytes(args.node_partial_kind)));
    };
    reduce_batch_in_order(
        ring_rows, num_batch_tokens, num_nodes, args.hidden,
        [&](int n, int row, int j) { return load_element(rdma.combine_partial(partial(n, row)), j, args.node_partial_kind); },
        [&](int i, int j, float sum) {
          store_element(args.combined_x, int64_t(batch_begin + i) * args.hidden + j, sum, args.element_kind);
        });
    if (args.combined_topk_weights != nullptr)
      reduce_batch_in_order(
          ring_rows, num_batch_tokens, num_nodes, args.num_topk,
          [&](int n, int row, int k) { return RdmaWorkspace::combine_weights(partial(n, row))[k]; },
          [&](int i, int k, float sum) { args.combined_topk_weights[int64_t(batch_begin + i) * args.num_topk + k] = sum; });
    __syncthreads();

    // Return the batch's slots to each forwarding node
    if (thread < 32) {
      uint32_t pending = ptx::ballot_sync(kFullWarpMask, is_ring_lane && needed > consumed);
      while (pending != 0) {
        int const node = __ffs(int(pending)) - 1;
        pending &= pending - 1;
        int const add = ptx::shfl_sync(kFullWarpMask, needed - consumed, node);
        transport.signal_add(WarpCoop{lane}, node * num_nvl_ranks + comm.local_rank(), rdma.combine_head_signal(channel, comm.node()),
                             uint64_t(add));
      }
      consumed = needed;
    }
  }
  // The next kernel continues each ring's row count from here
  if (is_ring_lane) *rdma.signal_base(local, rdma.combine_tail_signal(channel, ring_node)) = ring_base[ring_node] + uint64_t(consumed);
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(32 * max_block_warps<Transport>(), 1)
    internode_combine_kernel(InternodeCombineArgs<Transport> args) {
  // the notify before it rejected this call (call_check.cuh): nothing moves on any rank
  if (call_rejected(args.call_verdict))
    return report_call_rejected(internode_wait_context(args.comm, KernelId::kInternodeCombine, Role::kCallGate, -1, -1), args.call_verdict);
  int const channel = int(blockIdx.x) / kInternodeBlocksPerChannel;
  int const role_block = int(blockIdx.x) % kInternodeBlocksPerChannel;
  if (role_block == 0) {
    int const warp = int(threadIdx.x) / 32;
    if (warp < args.comm.num_nvl_ranks) combine_nvl_sender(args, channel, warp);
    // Channel 0's sender block has a spare warp (the block has >= L + 1): the abort watcher
    else if (warp == args.comm.num_nvl_ranks && channel == 0) return internode_abort_watcher(args.comm);
  } else if (role_block == 1) {
    combine_forwarder(args, channel);
  } else {
    combine_network_receiver(args, channel);
  }
  internode_warp_finished(args.comm);
}

}  // namespace epcomm::kernels
