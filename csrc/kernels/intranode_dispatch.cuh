#pragma once
// intranode_dispatch: channel c is blocks (2c, 2c + 1); the even block sends,
// the odd block receives. Warp w of a block serves peer w (blockDim = 32 x R).
// Rings and their protocol: channel.cuh. Rows received from `src` on
// `channel` land at rows [prefix[src][channel], prefix[src][channel + 1]) of
// the outputs (notify's recv_channel_prefix_matrix), so the result is ordered
// by source rank, then source token, whatever the timing.
//
// Planted bug (build flag) that the checks must catch:
//   EPCOMM_PLANT_DISPATCH_SKIP_HEAD  the receiver never frees slots (the sender's timeout fires)

#include <cstdint>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "intranode.hpp"
#include "ring_rows.cuh"

namespace epcomm::kernels {

// Writes token `token`'s row and metadata into the slot for row `row_idx` of ring (channel, rank) on `dst`.
EPCOMM_DEVICE void dispatch_write_slot(IntranodeDispatchArgs const& args, char* slot, int token, int lane) {
  NvlWorkspace const& ws = args.comm.workspace;
  warp_copy_words(reinterpret_cast<int32_t*>(slot),
                  static_cast<int32_t const*>(args.x) + int64_t(token) * (args.hidden_bytes / 4),
                  args.hidden_bytes / 4, lane);
  if (args.scale_bytes > 0)
    warp_copy_words(reinterpret_cast<int32_t*>(slot + args.hidden_bytes),
                    static_cast<int32_t const*>(args.x_scales) + int64_t(token) * (args.scale_bytes / 4),
                    args.scale_bytes / 4, lane);
  if (lane == 0) *ws.slot_src_idx(slot) = token;
  if (args.num_topk > 0) {
    for (int k = lane; k < args.num_topk; k += 32) {
      ws.slot_topk_idx(slot)[k] = args.topk_idx[int64_t(token) * args.num_topk + k];
      if (args.topk_weights != nullptr)
        ws.slot_topk_weights(slot)[k] = args.topk_weights[int64_t(token) * args.num_topk + k];
    }
  }
}

// Sends the rows of channel `channel`'s tokens that go to `dst`, in token order.
EPCOMM_DEVICE void dispatch_sender(IntranodeDispatchArgs const& args, int channel, int dst) {
  CommArgs const& comm = args.comm;
  NvlWorkspace const& ws = comm.workspace;
  int const lane = int(ptx::get_lane_id());
  void* const dst_buffer = comm.peer_buffers[dst];
  int32_t const* head = ws.ring_head(dst_buffer, channel, comm.rank);
  int32_t* tail = ws.ring_tail(dst_buffer, channel, comm.rank);
  WaitContext const context = comm_wait_context(comm, KernelId::kDispatch, Role::kDispatchSender, channel, dst);

  TokenRange const range = channel_token_range(args.num_tokens, comm.config.num_channels, channel);
  RingSender ring(head, tail, comm.config);
  for (int base = range.begin; base < range.end; base += 32) {
    // Which of the next 32 tokens go to `dst`
    int const token_of_lane = base + lane;
    bool const selected =
        token_of_lane < range.end && args.is_token_in_rank[int64_t(token_of_lane) * comm.num_ranks + dst];
    uint32_t pending = ptx::ballot_sync(kFullWarpMask, selected);
    while (pending != 0) {
      int const token = base + __ffs(int(pending)) - 1;
      pending &= pending - 1;
      if (!ring.reserve(context, lane)) return;
      dispatch_write_slot(args, ws.slot(dst_buffer, channel, comm.rank, ring.sent), token, lane);
      ring.commit(lane);
    }
  }
  ring.publish(lane);
}

// Copies slot `slot` out to received row `row`, localising expert ids (other ranks' experts become -1, weight 0).
EPCOMM_DEVICE void dispatch_read_slot(IntranodeDispatchArgs const& args, char* slot, int64_t row, int lane) {
  CommArgs const& comm = args.comm;
  // num_experts is only meaningful with topk_idx (num_topk > 0)
  int64_t const num_local_experts = args.num_topk > 0 ? uniform_num_local_experts(args.num_experts, comm.num_ranks) : 0;
  ReceivedRowOutputs const out{args.recv_x,        args.recv_x_scales, args.recv_topk_idx,
                               args.recv_topk_weights, args.recv_src_idx, args.hidden_bytes,
                               args.scale_bytes,   args.num_topk,      comm.rank,
                               num_local_experts};
  store_received_row(out, comm.workspace, slot, row, lane);
}

// Receives the rows `src` sends on `channel` into rows [prefix[src][channel], prefix[src][channel + 1]).
EPCOMM_DEVICE void dispatch_receiver(IntranodeDispatchArgs const& args, int channel, int src) {
  CommArgs const& comm = args.comm;
  NvlWorkspace const& ws = comm.workspace;
  int const lane = int(ptx::get_lane_id());
  void* const own_buffer = comm.peer_buffers[comm.rank];
  int32_t* head = ws.ring_head(own_buffer, channel, src);
  int32_t const* tail = ws.ring_tail(own_buffer, channel, src);
  WaitContext const context = comm_wait_context(comm, KernelId::kDispatch, Role::kDispatchReceiver, channel, src);

  int32_t const* prefix = args.recv_channel_prefix_matrix + int64_t(src) * (comm.config.num_channels + 1);
  int const first_row = prefix[channel], num_rows = prefix[channel + 1] - prefix[channel];
  // rows past the outputs' capacity are not written (the kernel reported kRecvOverflow)
  int64_t const capacity = args.recv_capacity >= 0 ? int64_t(args.recv_capacity) : INT64_MAX;
  int received = 0;
  while (received < num_rows) {
    // Wait for rows
    int tail_value = 0;
    if (!warp_wait_at_least(context, tail, received + 1, lane, &tail_value)) return;
    int const end = min_int(tail_value, num_rows);
    for (int row = received; row < end; ++row)
      if (int64_t(first_row) + row < capacity)
        dispatch_read_slot(args, ws.slot(own_buffer, channel, src, row), int64_t(first_row) + row, lane);
    received = end;
    // Free the slots
    ptx::syncwarp();
#if !defined(EPCOMM_PLANT_DISPATCH_SKIP_HEAD)
    if (lane == 0) ptx::st_release_sys_global(head, int32_t(received));
#else
    (void)head;
#endif
  }
}

EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(32 * kMaxNvlRanks, 1) intranode_dispatch_kernel(IntranodeDispatchArgs args) {
  // the notify before it rejected this call (call_check.cuh): nothing moves on any rank
  if (call_rejected(args.call_verdict))
    return report_call_rejected(comm_wait_context(args.comm, KernelId::kDispatch, Role::kCallGate, -1, -1), args.call_verdict);
  if (args.recv_capacity >= 0 && blockIdx.x == 0 && threadIdx.x == 0) {
    // counted on the device: the host never saw how many rows arrive, so the kernel checks they fit
    int const num_ranks = args.comm.num_ranks, num_channels = args.comm.config.num_channels;
    int32_t const num_recv = args.recv_channel_prefix_matrix[int64_t(num_ranks) * (num_channels + 1) - 1];
    if (num_recv > args.recv_capacity)
      report_failure(comm_wait_context(args.comm, KernelId::kDispatch, Role::kDispatchReceiver, -1, -1),
                     ErrorCode::kRecvOverflow, args.recv_capacity, num_recv);
  }
  int const channel = int(blockIdx.x) / 2;
  int const peer = int(threadIdx.x) / 32;
  if (peer >= args.comm.num_ranks) return;
  if (blockIdx.x % 2 == 0) {
    dispatch_sender(args, channel, peer);
  } else {
    dispatch_receiver(args, channel, peer);
  }
}

}  // namespace epcomm::kernels
