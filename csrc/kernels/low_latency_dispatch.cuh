#pragma once
// The two kernels of the low-latency dispatch (protocol: low_latency.hpp). Warps of a grid take work
// items in turn (item w, w + num_warps, ...); no warp waits on another warp of its grid.
//
// low_latency_dispatch_send, per warp:
//   count sender   global expert e: count = tokens of this rank routed to e; put it into
//                  counts[slot][j][this rank] of e's owner with dispatch signal += M + 1 - count
//   row sender     token n: check its expert ids; the quantizer stages it once (bf16 copy, or e4m3 +
//                  per-128 scales) in dispatch_staging[slot][n]; then for k ascending, put the message
//                  to slot p = slot_of[n, k] of (expert, this rank) on the owner, dispatch signal += 1
// low_latency_dispatch_recv, per warp:
//   slice receiver (local expert j, source s): wait for (j, s)'s unit (its wait time goes to the
//                  statistics), then for every s' < s (a lane per source); begin = counts of s' < s; place the slice's
//                  rows at [begin, begin + count) of expert j: data, scales (token fastest), src_info;
//                  write layout_range (and, for s = R - 1, recv_count and the cumulative count)
//
// Planted bug (build flag) that the checks must catch:
//   EPCOMM_PLANT_LL_COUNT_CLAIMS_UNIT  the count message adds the whole unit (M + 1), so receivers may
//                                      read rows before they land (TSAN reports a race in the receiver)

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "low_latency_common.cuh"

namespace epcomm::kernels {

// Lanes count the tokens in [0, end) whose row contains `expert`.
EPCOMM_DEVICE int ll_count_tokens(int64_t const* topk_idx, int num_topk, int end, int64_t expert, int lane) {
  int count = 0;
  for (int token = lane; token < end; token += 32) {
    int64_t const* row = topk_idx + int64_t(token) * num_topk;
    bool hit = false;
    for (int k = 0; k < num_topk; ++k) hit = hit || row[k] == expert;
    count += hit ? 1 : 0;
  }
  return ll_warp_sum(count, lane);
}

// Count sender: expert `expert`'s owner learns how many of this rank's tokens it gets.
template <class Transport>
EPCOMM_DEVICE void ll_count_sender(LowLatencyDispatchSendArgs<Transport> const& args, int expert, int lane) {
  LowLatencyComm<Transport> const& comm = args.comm;
  LowLatencyLayout const& layout = comm.layout;
  int const owner = expert / layout.num_local_experts, local_expert = expert % layout.num_local_experts;
  int const count = ll_count_tokens(args.topk_idx, args.num_topk, args.num_tokens, expert, lane);
  if (lane == 0) *reinterpret_cast<int32_t*>(comm.transport.local_buffer() + layout.count_staging(args.slot, expert)) = count;
  ptx::syncwarp();
#if defined(EPCOMM_PLANT_LL_COUNT_CLAIMS_UNIT)
  uint64_t const add = layout.signal_unit();
#else
  uint64_t const add = layout.signal_unit() - uint64_t(count);
#endif
  comm.transport.put_signal(WarpCoop{lane}, owner, layout.count(args.slot, local_expert, comm.rank),
                            layout.count_staging(args.slot, expert), sizeof(int32_t),
                            layout.dispatch_signal(args.slot, local_expert, comm.rank), add);
}

// Row sender, step 1: every expert id of `token` is -1 or in [0, E), none twice. Reports the first bad one.
template <class Transport>
EPCOMM_DEVICE bool ll_check_token(LowLatencyDispatchSendArgs<Transport> const& args, int token, int lane) {
  int const num_topk = args.num_topk, num_experts = args.comm.layout.num_experts();
  int64_t const* row = args.topk_idx + int64_t(token) * num_topk;
  int64_t const expert = lane < num_topk ? row[lane] : -1;
  bool bad = expert < -1 || expert >= num_experts;
  for (int k = 0; k < lane && k < num_topk; ++k) bad = bad || (expert >= 0 && row[k] == expert);
  uint32_t const bad_lanes = ptx::ballot_sync(kFullWarpMask, bad);
  if (bad_lanes == 0) return true;
  int64_t const observed = ptx::shfl_sync(kFullWarpMask, expert, __ffs(int(bad_lanes)) - 1);
  ll_fail(args.comm, ll_context(args.comm, KernelId::kLowLatencyDispatchSend, Role::kLlRowSender, -1, -1),
          ErrorCode::kBadInput, num_experts, observed, lane);
  return false;
}

// Row sender, step 2 (the quantizer): `token`'s message in `message` (this rank's staging).
template <class Transport>
EPCOMM_DEVICE void ll_quantizer(LowLatencyDispatchSendArgs<Transport> const& args, char* message, int token, int lane) {
  int const hidden = args.comm.layout.hidden;
  if (lane == 0) *reinterpret_cast<int32_t*>(message) = token;
  char* const data = message + LowLatencyLayout::kMessageHeaderBytes;
  uint16_t const* x = static_cast<uint16_t const*>(args.x) + int64_t(token) * hidden;
  if (!args.use_fp8) return warp_copy_vectors(data, x, hidden * 2 / 16, lane);
  // FP8: lane l holds elements 4l .. 4l + 3 of each 128-element block
  uint32_t* const data_words = reinterpret_cast<uint32_t*>(data);
  uint32_t* const scale_words = reinterpret_cast<uint32_t*>(data + hidden);
  uint32_t packed = 0;
  for (int block = 0; block < hidden / kLowLatencyScaleBlock; ++block) {
    uint32_t const* in = reinterpret_cast<uint32_t const*>(x + block * kLowLatencyScaleBlock) + 2 * lane;
    uint32_t const pair0 = in[0], pair1 = in[1];
    float const v0 = bf16_bits_to_float(uint16_t(pair0 & 0xffffu)), v1 = bf16_bits_to_float(uint16_t(pair0 >> 16));
    float const v2 = bf16_bits_to_float(uint16_t(pair1 & 0xffffu)), v3 = bf16_bits_to_float(uint16_t(pair1 >> 16));
    float const amax = ll_warp_max(ll_max_magnitude(ll_max_magnitude(v0, v1), ll_max_magnitude(v2, v3)), lane);
    float const scale = ll_block_scale(amax, args.round_scale);
    data_words[block * 32 + lane] = uint32_t(float_to_e4m3_bits(v0 / scale)) |
                                    uint32_t(float_to_e4m3_bits(v1 / scale)) << 8 |
                                    uint32_t(float_to_e4m3_bits(v2 / scale)) << 16 |
                                    uint32_t(float_to_e4m3_bits(v3 / scale)) << 24;
    if (lane != 0) continue;
    if (!args.use_ue8m0) {
      scale_words[block] = float_to_bits(scale);
      continue;
    }
    // UE8M0: block i's exponent in byte i % 4 of word i / 4
    int const byte = block % kLowLatencyUe8m0Group;
    packed |= ll_ue8m0_byte(scale) << (8 * byte);
    if (byte == kLowLatencyUe8m0Group - 1) {
      scale_words[block / kLowLatencyUe8m0Group] = packed;
      packed = 0;
    }
  }
}

// Row sender, step 3: the staged message of `token` goes to each of its experts, k ascending.
template <class Transport>
EPCOMM_DEVICE void ll_row_sender(LowLatencyDispatchSendArgs<Transport> const& args, int token, int lane) {
  LowLatencyComm<Transport> const& comm = args.comm;
  LowLatencyLayout const& layout = comm.layout;
  int const num_topk = args.num_topk;
  size_t const staging = layout.dispatch_staging(args.slot, token);
  int const used_bytes = low_latency_message(layout.hidden, args.use_fp8, args.use_ue8m0).used_bytes();
  for (int k = 0; k < num_topk; ++k) {
    int64_t const expert = args.topk_idx[int64_t(token) * num_topk + k];
    int const position = expert < 0 ? -1 : ll_count_tokens(args.topk_idx, num_topk, token, expert, lane);
    if (lane == 0) args.slot_of[int64_t(token) * num_topk + k] = position;
    if (expert < 0) continue;
    int const owner = int(expert) / layout.num_local_experts, local_expert = int(expert) % layout.num_local_experts;
    comm.transport.put_signal(WarpCoop{lane}, owner, layout.dispatch_recv(args.slot, local_expert, comm.rank, position),
                              staging, size_t(used_bytes), layout.dispatch_signal(args.slot, local_expert, comm.rank), 1);
  }
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kLowLatencyThreads, 1)
    low_latency_dispatch_send_kernel(LowLatencyDispatchSendArgs<Transport> args) {
  int const lane = int(ptx::get_lane_id());
  int const warp = int(blockIdx.x) * (int(blockDim.x) / 32) + int(threadIdx.x) / 32;
  int const num_warps = int(gridDim.x) * (int(blockDim.x) / 32);
  char* const local = args.comm.transport.local_buffer();
  ll_count_call(args.comm, args.slot, /*combine=*/false);
  for (int expert = warp; expert < args.comm.layout.num_experts(); expert += num_warps)
    ll_count_sender(args, expert, lane);
  for (int token = warp; token < args.num_tokens; token += num_warps) {
    if (!ll_check_token(args, token, lane)) continue;
    ll_quantizer(args, local + args.comm.layout.dispatch_staging(args.slot, token), token, lane);
    ptx::syncwarp();  // every lane's part of the message is written before any lane copies it
    ll_row_sender(args, token, lane);
  }
  args.comm.transport.flush(WarpCoop{lane});
}

// Slice receiver, last step: row `position` of source `source`'s slice lands at row `row` of expert `local_expert`.
template <class Transport>
EPCOMM_DEVICE void ll_place_row(LowLatencyDispatchRecvArgs<Transport> const& args, int local_expert, int source,
                                int position, int64_t row, LowLatencyMessage format, int lane) {
  LowLatencyLayout const& layout = args.comm.layout;
  char const* const message =
      args.comm.transport.local_buffer() + layout.dispatch_recv(args.slot, local_expert, source, position);
  int64_t const out_row = int64_t(local_expert) * layout.rows_per_expert() + row;
  if (lane == 0) args.src_info[out_row] = *reinterpret_cast<int32_t const*>(message);
  char const* const data = message + LowLatencyLayout::kMessageHeaderBytes;
  warp_copy_vectors(static_cast<char*>(args.recv_x) + out_row * format.data_bytes, data, format.data_bytes / 16, lane);
  uint32_t const* const scales_in = reinterpret_cast<uint32_t const*>(data + format.data_bytes);
  uint32_t* const scales_out = static_cast<uint32_t*>(args.recv_x_scales);
  for (int word = lane; word < format.scale_words; word += 32)
    scales_out[(int64_t(local_expert) * format.scale_words + word) * layout.rows_per_expert() + row] = scales_in[word];
}

// Slice receiver: source `source`'s rows for local expert `local_expert`.
template <class Transport>
EPCOMM_DEVICE void ll_slice_receiver(LowLatencyDispatchRecvArgs<Transport> const& args, int local_expert, int source,
                                     int lane) {
  LowLatencyComm<Transport> const& comm = args.comm;
  LowLatencyLayout const& layout = comm.layout;
  uint64_t const expected = ll_expected(comm, args.slot, /*combine=*/false);
  // This source's slice (lane 0; the wait statistic), then every earlier source's count (for begin),
  // 32 sources at a time
  long long waited = 0;
  WaitContext context =
      ll_context(comm, KernelId::kLowLatencyDispatchRecv, Role::kLlSliceReceiver, local_expert, source);
  if (!ll_warp_wait(comm, context, lane == 0 ? layout.dispatch_signal(args.slot, local_expert, source) : -1, expected,
                    lane, &waited))
    return;
  if (args.dispatch_wait_recv_cost_stats != nullptr && lane == 0)
    atomicAdd(reinterpret_cast<unsigned long long*>(args.dispatch_wait_recv_cost_stats + source),
              static_cast<unsigned long long>(waited));
  for (int first = 0; first < source; first += 32) {
    int const earlier = first + lane;
    context.peer = earlier;
    if (!ll_warp_wait(comm, context, earlier < source ? layout.dispatch_signal(args.slot, local_expert, earlier) : -1,
                      expected, lane, nullptr))
      return;
  }
  char const* const local = comm.transport.local_buffer();
  auto const count_of = [&](int s) {
    return *reinterpret_cast<int32_t const*>(local + layout.count(args.slot, local_expert, s));
  };
  int before = 0;
  for (int earlier = lane; earlier < source; earlier += 32) before += count_of(earlier);
  int const begin = ll_warp_sum(before, lane), count = count_of(source);
  if (lane == 0) {
    args.layout_range[int64_t(local_expert) * comm.num_ranks + source] = int64_t(begin) << 32 | int64_t(count);
    if (source == comm.num_ranks - 1) {
      args.recv_count[local_expert] = begin + count;
      if (args.cumulative_local_expert_recv_stats != nullptr)
        atomicAdd(args.cumulative_local_expert_recv_stats + local_expert, begin + count);
    }
  }
  LowLatencyMessage const format = low_latency_message(layout.hidden, args.use_fp8, args.use_ue8m0);
  for (int position = 0; position < count; ++position)
    ll_place_row(args, local_expert, source, position, int64_t(begin) + position, format, lane);
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kLowLatencyThreads, 1)
    low_latency_dispatch_recv_kernel(LowLatencyDispatchRecvArgs<Transport> args) {
  int const lane = int(ptx::get_lane_id());
  int const warp = int(blockIdx.x) * (int(blockDim.x) / 32) + int(threadIdx.x) / 32;
  int const num_warps = int(gridDim.x) * (int(blockDim.x) / 32);
  int const num_ranks = args.comm.num_ranks;
  for (int pair = warp; pair < args.comm.layout.num_experts(); pair += num_warps)
    ll_slice_receiver(args, pair / num_ranks, pair % num_ranks, lane);
}

}  // namespace epcomm::kernels
