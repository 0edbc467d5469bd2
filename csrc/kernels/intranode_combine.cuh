#pragma once
// intranode_combine: the reverse of dispatch. Channel c is blocks (2c, 2c + 1).
//   even block (sender), warp w: the rows this rank received from rank w on
//     channel c (rows [prefix[w][c], prefix[w][c + 1]) of x) go back, in order,
//     through ring (c, this rank) in rank w's buffer;
//   odd block (receiver): for the tokens of channel c, in batches, warp 0's lane d
//     works out which row of ring (c, d) holds each token and waits until the
//     tail covers them; then every thread reduces: per token and element,
//     partial = 0; partial += float(row_d) for d ascending; out = dtype(0 + partial)
//     (the torch backend's order for one node); then lane d frees the rows.
// Rows are bf16, fp16 or fp32 (args.element_kind); sums are fp32, rounded once.
// A batch holds at most ring - chunk + 1 tokens: the receiver never needs a row
// the sender cannot write before the receiver frees slots (no deadlock).

#include <cstdint>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "elements.cuh"
#include "intranode.hpp"
#include "ordered_reduce.cuh"
#include "ring_rows.cuh"

namespace epcomm::kernels {

// Sends this rank's rows that came from `dst` on `channel` back to `dst`.
EPCOMM_DEVICE void combine_sender(IntranodeCombineArgs const& args, int channel, int dst) {
  CommArgs const& comm = args.comm;
  NvlWorkspace const& ws = comm.workspace;
  int const lane = int(ptx::get_lane_id());
  void* const dst_buffer = comm.peer_buffers[dst];
  WaitContext const context = comm_wait_context(comm, KernelId::kCombine, Role::kCombineSender, channel, dst);
  RingSender ring(ws.ring_head(dst_buffer, channel, comm.rank), ws.ring_tail(dst_buffer, channel, comm.rank),
                  comm.config);

  int32_t const* prefix = args.recv_channel_prefix_matrix + int64_t(dst) * (comm.config.num_channels + 1);
  int const row_bytes = args.hidden * element_bytes(args.element_kind);
  int64_t const last_row = args.x_rows > 0 ? int64_t(args.x_rows) - 1 : INT64_MAX;  // x_rows: see intranode.hpp
  for (int64_t row = prefix[channel]; row < prefix[channel + 1]; ++row) {
    if (!ring.reserve(context, lane)) return;
    write_combine_slot(ws, ws.slot(dst_buffer, channel, comm.rank, ring.sent), args.x, args.topk_weights,
                       row < last_row ? row : last_row, row_bytes, args.num_topk, lane);
    ring.commit(lane);
  }
  ring.publish(lane);
}

// The x part of one batch's reduction with 16-byte loads and stores: each thread sums
// kElementsPerVector<kKind> consecutive elements of every source row at once. Needs whole vectors per
// row and a 16-byte aligned combined_x (the ring slots are aligned; rows start on 16 bytes).
template <ElementKind kKind>
EPCOMM_DEVICE void reduce_batch_x_vectors(IntranodeCombineArgs const& args, void* own_buffer, int channel,
                                          int const (&rows)[kMaxCombineBatchTokens][kMaxNvlRanks], int num_tokens,
                                          int batch_begin) {
  constexpr int kVector = kElementsPerVector<kKind>;
  constexpr int kElementBytes = 16 / kVector;
  NvlWorkspace const& ws = args.comm.workspace;
  reduce_batch_in_order_vectors<kVector>(
      rows, num_tokens, args.comm.num_ranks, args.hidden,
      [&](int d, int row, int j, float (&values)[kVector]) {
        widen_vector<kKind>(*reinterpret_cast<Vec16 const*>(ws.slot(own_buffer, channel, d, row) + j * kElementBytes),
                            values);
      },
      [&](int i, int j, float const (&sums)[kVector]) {
        char* const out = static_cast<char*>(args.combined_x) + (int64_t(batch_begin + i) * args.hidden + j) * kElementBytes;
        *reinterpret_cast<Vec16*>(out) = narrow_vector<kKind>(sums);
      });
}

// Reduces the channel's tokens in batches; every thread of the block takes part.
EPCOMM_DEVICE void combine_receiver(IntranodeCombineArgs const& args, int channel) {
  // ring row holding batch token i's row from rank d, or -1 when rank d has no row of it
  __shared__ int ring_rows[kMaxCombineBatchTokens][kMaxNvlRanks];
  __shared__ int failed;
  CommArgs const& comm = args.comm;
  NvlWorkspace const& ws = comm.workspace;
  int const num_ranks = comm.num_ranks;
  void* const own_buffer = comm.peer_buffers[comm.rank];
  int const thread = int(threadIdx.x);
  bool const is_ring_lane = thread < num_ranks;  // warp 0, lane d: ring (channel, d)
  int const ring_src = thread;
  int consumed = 0;  // ring lane: rows of its ring consumed so far
  if (thread == 0) failed = 0;

  TokenRange const range = channel_token_range(args.num_tokens, comm.config.num_channels, channel);
  int const batch_tokens = combine_batch_tokens(comm.config);
  bool const vectors = (args.hidden * element_bytes(args.element_kind)) % 16 == 0 &&
                       is_16_byte_aligned(args.combined_x);
  for (int batch_begin = range.begin; batch_begin < range.end; batch_begin += batch_tokens) {
    int const num_batch_tokens = min_int(batch_tokens, range.end - batch_begin);
    int needed = consumed;
    if (is_ring_lane) {
      // Place the batch's rows from `ring_src`, then wait until its tail covers them
      for (int i = 0; i < num_batch_tokens; ++i) {
        bool const in_rank = args.is_token_in_rank[int64_t(batch_begin + i) * num_ranks + ring_src];
        ring_rows[i][ring_src] = in_rank ? needed++ : -1;
      }
      if (needed > consumed) {
        WaitContext const context =
            comm_wait_context(comm, KernelId::kCombine, Role::kCombineReceiver, channel, ring_src);
        int32_t const* tail = ws.ring_tail(own_buffer, channel, ring_src);
        if (!wait_at_least(context, needed, [&] { return ptx::ld_acquire_sys_global(tail); }, nullptr))
          atomicOr(&failed, 1);
      }
    }
    __syncthreads();
    if (failed != 0) return;

    // Reduce: ascending source rank, fp32, starting from +0.0, one rounding to the rows' dtype; 16 bytes
    // per load and store when the rows allow it (the same sums, the same bits)
    if (vectors && args.element_kind == ElementKind::kBfloat16) {
      reduce_batch_x_vectors<ElementKind::kBfloat16>(args, own_buffer, channel, ring_rows, num_batch_tokens, batch_begin);
    } else if (vectors && args.element_kind == ElementKind::kFloat32) {
      reduce_batch_x_vectors<ElementKind::kFloat32>(args, own_buffer, channel, ring_rows, num_batch_tokens, batch_begin);
    } else if (vectors) {
      reduce_batch_x_vectors<ElementKind::kFloat16>(args, own_buffer, channel, ring_rows, num_batch_tokens, batch_begin);
    } else {
      reduce_batch_in_order(
          ring_rows, num_batch_tokens, num_ranks, args.hidden,
          [&](int d, int row, int j) { return load_element(ws.slot(own_buffer, channel, d, row), j, args.element_kind); },
          [&](int i, int j, float sum) {
            store_element(args.combined_x, int64_t(batch_begin + i) * args.hidden + j, sum, args.element_kind);
          });
    }
    if (args.combined_topk_weights != nullptr)
      reduce_batch_in_order(
          ring_rows, num_batch_tokens, num_ranks, args.num_topk,
          [&](int d, int row, int k) { return ws.slot_topk_weights(ws.slot(own_buffer, channel, d, row))[k]; },
          [&](int i, int k, float sum) { args.combined_topk_weights[int64_t(batch_begin + i) * args.num_topk + k] = sum; });
    __syncthreads();

    // Free the batch's rows
    if (is_ring_lane && needed > consumed) {
      ptx::st_release_sys_global(ws.ring_head(own_buffer, channel, ring_src), int32_t(needed));
      consumed = needed;
    }
  }
}

EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(32 * kMaxNvlRanks, 1) intranode_combine_kernel(IntranodeCombineArgs args) {
  // the notify before it rejected this call (call_check.cuh): nothing moves on any rank
  if (call_rejected(args.call_verdict))
    return report_call_rejected(comm_wait_context(args.comm, KernelId::kCombine, Role::kCallGate, -1, -1), args.call_verdict);
  int const channel = int(blockIdx.x) / 2;
  if (blockIdx.x % 2 == 0) {
    int const peer = int(threadIdx.x) / 32;
    if (peer < args.comm.num_ranks) combine_sender(args, channel, peer);
  } else {
    combine_receiver(args, channel);
  }
}

}  // namespace epcomm::kernels
