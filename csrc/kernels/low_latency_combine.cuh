#pragma once
// The two kernels of the low-latency combine (protocol: low_latency.hpp). Warps take work items in turn.
//
// low_latency_combine_send, per warp:
//   combine row sender (local expert j, source s): slice [begin, begin + count) of layout_range; row p
//                  (staged into the slot's combine_send buffer unless x already is that buffer) goes to
//                  combine_recv[slot][e = this rank * L + j][p] on s, combine signal (slot, e) += 1;
//                  then the signal += M + 1 - count, completing the unit
// low_latency_combine_recv, per warp:
//   reducer        (token n, 256-element chunk): waits for the unit of each expert of n (lane k for
//                  expert topk_idx[n, k]), then
//                  out[n, chunk] = bf16(sum over k ascending of w[n, k] * float(row)), fp32 from 0.0f

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "low_latency_common.cuh"

namespace epcomm::kernels {

// Combine row sender: this rank's rows of local expert `local_expert` that came from `source`.
template <class Transport>
EPCOMM_DEVICE void ll_combine_row_sender(LowLatencyCombineSendArgs<Transport> const& args, int local_expert,
                                         int source, int lane) {
  LowLatencyComm<Transport> const& comm = args.comm;
  LowLatencyLayout const& layout = comm.layout;
  char* const local = comm.transport.local_buffer();
  int64_t const range = args.layout_range[int64_t(local_expert) * comm.num_ranks + source];
  int64_t const begin = range >> 32, count = range & 0xffffffff;
  if (begin < 0 || count > layout.num_max_tokens || begin + count > layout.rows_per_expert()) {
    ll_fail(comm, ll_context(comm, KernelId::kLowLatencyCombineSend, Role::kLlCombineSender, local_expert, source),
            ErrorCode::kBadInput, layout.rows_per_expert(), begin + count, lane);
    return;
  }
  int const expert = comm.rank * layout.num_local_experts + local_expert;
  int const signal = layout.combine_signal(args.slot, expert);
  bool const zero_copy = static_cast<char const*>(args.x) == local + layout.combine_send_buffer(args.slot);
  for (int position = 0; position < int(count); ++position) {
    int64_t const row = begin + position;
    size_t const staged = layout.combine_send_row(args.slot, local_expert, row);
    if (!zero_copy) {
      warp_copy_vectors(local + staged,
                     static_cast<char const*>(args.x) + (int64_t(local_expert) * layout.rows_per_expert() + row) *
                                                            int64_t(layout.row_bytes()),
                     int(layout.row_bytes() / 16), lane);
      ptx::syncwarp();  // the staged row is whole before any lane copies it
    }
    comm.transport.put_signal(WarpCoop{lane}, source, layout.combine_recv(args.slot, expert, position), staged,
                              layout.row_bytes(), signal, 1);
  }
  comm.transport.signal_add(WarpCoop{lane}, source, signal, layout.signal_unit() - uint64_t(count));
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kLowLatencyThreads, 1)
    low_latency_combine_send_kernel(LowLatencyCombineSendArgs<Transport> args) {
  int const lane = int(ptx::get_lane_id());
  int const warp = int(blockIdx.x) * (int(blockDim.x) / 32) + int(threadIdx.x) / 32;
  int const num_warps = int(gridDim.x) * (int(blockDim.x) / 32);
  int const num_ranks = args.comm.num_ranks;
  ll_count_call(args.comm, args.slot, /*combine=*/true);
  for (int pair = warp; pair < args.comm.layout.num_experts(); pair += num_warps)
    ll_combine_row_sender(args, pair / num_ranks, pair % num_ranks, lane);
  args.comm.transport.flush(WarpCoop{lane});
}

// Reducer, step 1: every expert of `token` delivered its rows (lane k waits for expert k's), and its
// slot_of entries are in range.
template <class Transport>
EPCOMM_DEVICE bool ll_wait_token_rows(LowLatencyCombineRecvArgs<Transport> const& args, int token, int lane) {
  LowLatencyComm<Transport> const& comm = args.comm;
  LowLatencyLayout const& layout = comm.layout;
  int64_t const expert = lane < args.num_topk ? args.topk_idx[int64_t(token) * args.num_topk + lane] : -1;
  int const position = expert < 0 ? 0 : args.slot_of[int64_t(token) * args.num_topk + lane];
  WaitContext const context = ll_context(comm, KernelId::kLowLatencyCombineRecv, Role::kLlReducer, int(expert),
                                         int(expert / layout.num_local_experts));
  bool const bad = expert >= layout.num_experts() || position < 0 || position >= layout.num_max_tokens;
  uint32_t const bad_lanes = ptx::ballot_sync(kFullWarpMask, bad);
  if (bad_lanes != 0) {
    int const leader = __ffs(int(bad_lanes)) - 1;
    if (lane == leader) report_failure(context, ErrorCode::kBadInput, layout.num_max_tokens, position);
    ll_raise_abort(comm, lane);
    return false;
  }
  uint64_t const expected = ll_expected(comm, args.slot, /*combine=*/true);
  return ll_warp_wait(comm, context, expert >= 0 ? layout.combine_signal(args.slot, int(expert)) : -1, expected, lane,
                      nullptr);
}

// Reducer, step 2: lane's 8 elements [element, element + 8) of `token`.
template <class Transport>
EPCOMM_DEVICE void ll_reduce_elements(LowLatencyCombineRecvArgs<Transport> const& args, int token, int element) {
  LowLatencyLayout const& layout = args.comm.layout;
  char const* const local = args.comm.transport.local_buffer();
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int k = 0; k < args.num_topk; ++k) {
    int64_t const index = int64_t(token) * args.num_topk + k;
    int64_t const expert = args.topk_idx[index];
    if (expert < 0) continue;
    float const weight = args.topk_weights[index];
    float values[8];
    widen_vector<ElementKind::kBfloat16>(
        *reinterpret_cast<Vec16 const*>(local + layout.combine_recv(args.slot, int(expert), args.slot_of[index]) +
                                        size_t(element) * 2),
        values);
#if EPCOMM_TARGET_CUDA
#pragma unroll
#endif
    for (int i = 0; i < 8; ++i) acc[i] = add_rn(acc[i], mul_rn(weight, values[i]));
  }
  *reinterpret_cast<Vec16*>(static_cast<char*>(args.out) + (int64_t(token) * layout.hidden + element) * 2) =
      narrow_vector<ElementKind::kBfloat16>(acc);
}

template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kLowLatencyThreads, 1)
    low_latency_combine_recv_kernel(LowLatencyCombineRecvArgs<Transport> args) {
  int const lane = int(ptx::get_lane_id());
  int const warp = int(blockIdx.x) * (int(blockDim.x) / 32) + int(threadIdx.x) / 32;
  int const num_warps = int(gridDim.x) * (int(blockDim.x) / 32);
  int const hidden = args.comm.layout.hidden, num_chunks = low_latency_reduce_chunks(hidden);
  for (int64_t item = warp; item < int64_t(args.num_tokens) * num_chunks; item += num_warps) {
    int const token = int(item / num_chunks), chunk = int(item % num_chunks);
    if (!ll_wait_token_rows(args, token, lane)) return;
    int const element = chunk * kLowLatencyReduceElements + 8 * lane;
    if (element < hidden) ll_reduce_elements(args, token, element);
  }
}

}  // namespace epcomm::kernels
