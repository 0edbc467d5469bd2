#pragma once
// notify: one block per rank.
//   1. reset this rank's ring counters (no peer uses them: every peer finished
//      the previous kernel towards us, and none starts the next one before step 3)
//   2. (exchange_counts) write this rank's per-(peer, channel) token counts and
//      per-expert counts into each peer's buffer
//   3. barrier: publish this notify's epoch (epoch.cuh: counted on the device) in every peer's
//      barrier_signal[rank] (release), wait for barrier_signal[s] >= epoch for every source s (acquire)
//   4. (exchange_counts) build recv_rank_prefix, recv_channel_prefix_matrix and
//      num_recv_tokens_per_expert from the counts the peers wrote.
// With a call check (call_flags >= 0), step 2 also writes this rank's call header into every
// peer and step 4 compares the headers the peers wrote into call_agreed (call_check.cuh).
// Counts and headers are double-buffered by epoch parity: a peer can be at most one barrier ahead.

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "call_check.cuh"
#include "epoch.cuh"
#include "intranode.hpp"
#include "prefix.cuh"

namespace epcomm::kernels {

EPCOMM_DEVICE void notify_send_counts(NotifyArgs const& args, int parity) {
  CommArgs const& comm = args.comm;
  int const num_channels = comm.config.num_channels;
  // Per (destination, channel): tokens of the channel's range that go to the destination
  for (int pair = int(threadIdx.x); pair < comm.num_ranks * num_channels; pair += int(blockDim.x)) {
    int const dst = pair / num_channels, channel = pair % num_channels;
    TokenRange const range = channel_token_range(args.num_tokens, num_channels, channel);
    int count = 0;
    for (int t = range.begin; t < range.end; ++t) count += args.is_token_in_rank[int64_t(t) * comm.num_ranks + dst];
    comm.workspace.channel_counts(comm.peer_buffers[dst], parity, comm.rank)[channel] = count;
  }
  // Per (destination, local expert): tokens of this rank that chose the expert
  int const num_local_experts = comm.workspace.num_local_experts;
  if (args.num_tokens_per_expert == nullptr) return;
  for (int pair = int(threadIdx.x); pair < comm.num_ranks * num_local_experts; pair += int(blockDim.x)) {
    int const dst = pair / num_local_experts, local_expert = pair % num_local_experts;
    comm.workspace.expert_counts(comm.peer_buffers[dst], parity, comm.rank)[local_expert] =
        args.num_tokens_per_expert[pair];
  }
}

// This rank's call header, into slot [parity][rank] of every peer (self included).
EPCOMM_DEVICE void notify_send_call_header(NotifyArgs const& args, int64_t epoch) {
  CommArgs const& comm = args.comm;
  int const parity = epoch_parity(epoch);
  CallHeader const header = make_call_header(args.call_digest, args.call_flags, epoch);
  for (int dst = int(threadIdx.x); dst < comm.num_ranks; dst += int(blockDim.x))
    *comm.workspace.call_header(comm.peer_buffers[dst], parity, comm.rank) = header;
}

EPCOMM_DEVICE void notify_judge_call(NotifyArgs const& args, int64_t epoch) {
  CommArgs const& comm = args.comm;
  void* const own_buffer = comm.peer_buffers[comm.rank];
  int const parity = epoch_parity(epoch);
  if (threadIdx.x == 0)
    judge_call(comm.num_ranks, args.call_digest, epoch,
               [&](int src) { return comm.workspace.call_header(own_buffer, parity, src); }, args.call_agreed,
               args.call_mismatch);
}

// Returns false (in every thread) when a peer never arrived.
EPCOMM_DEVICE bool notify_barrier(NotifyArgs const& args, int64_t epoch) {
  __shared__ int failed;
  CommArgs const& comm = args.comm;
  if (threadIdx.x == 0) failed = 0;
  // Publish: everything this block wrote (counters reset, counts) happens-before the signal
  __syncthreads();
  int const peer = int(threadIdx.x);
  if (peer < comm.num_ranks) {
    ptx::st_release_sys_global(comm.workspace.barrier_signal(comm.peer_buffers[peer], comm.rank), epoch);
    // Wait for the peer's signal to this rank
    WaitContext const context{comm.error, comm.peer_buffers, comm.workspace.abort_flag_offset, comm.num_ranks,
                              comm.rank, KernelId::kNotify, Role::kNotifyBarrier, -1, peer, comm.timeout_cycles};
    int64_t const* signal = comm.workspace.barrier_signal(comm.peer_buffers[comm.rank], peer);
    if (!wait_at_least(context, epoch, [&] { return ptx::ld_acquire_sys_global(signal); }, nullptr))
      atomicOr(&failed, 1);
  }
  __syncthreads();
  return failed == 0;
}

EPCOMM_DEVICE void notify_build_prefixes(NotifyArgs const& args, int parity) {
  CommArgs const& comm = args.comm;
  void* const own_buffer = comm.peer_buffers[comm.rank];
  int const num_channels = comm.config.num_channels;
  if (threadIdx.x == 0)
    build_channel_prefix(
        comm.num_ranks, num_channels, [&](int src) { return comm.workspace.channel_counts(own_buffer, parity, src); },
        args.recv_channel_prefix_matrix, args.recv_rank_prefix);
  if (args.num_recv_tokens_per_expert == nullptr) return;
  sum_expert_counts(comm.workspace.num_local_experts, comm.num_ranks, args.expert_alignment,
                    [&](int src) { return comm.workspace.expert_counts(own_buffer, parity, src); },
                    args.num_recv_tokens_per_expert);
}

EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS(kNotifyThreads) notify_kernel(NotifyArgs args) {
  CommArgs const& comm = args.comm;
  void* const own_buffer = comm.peer_buffers[comm.rank];
  int64_t const epoch = advance_epoch(comm.workspace.epoch_counter(own_buffer));
  int const parity = epoch_parity(epoch);
  // Reset this rank's ring counters
  for (int i = int(threadIdx.x); i < comm.workspace.num_ring_counters(); i += int(blockDim.x)) {
    comm.workspace.ring_head(own_buffer, 0, 0)[i] = 0;
    comm.workspace.ring_tail(own_buffer, 0, 0)[i] = 0;
  }
  bool const check_call = args.call_flags != kNoCallCheck;
  if (check_call) notify_send_call_header(args, epoch);
  if (args.exchange_counts) notify_send_counts(args, parity);
  if (!notify_barrier(args, epoch)) return;
  if (check_call) notify_judge_call(args, epoch);
  if (args.exchange_counts) notify_build_prefixes(args, parity);
}

}  // namespace epcomm::kernels
