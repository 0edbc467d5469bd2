#pragma once
// A single-producer / single-consumer ring of warp-sized messages: the
// protocol shape of epcomm's channels, small enough to test the SIMT layer.
// Compiled for sm_90 by nvcc (tests/ptx_check.cu) and for the CPU by the
// SIMT tests, from this one source.
//
// Planted bugs (build flags), which the checks must catch:
//   EPCOMM_PLANT_RELAXED_TAIL     publish the tail with a relaxed store: TSAN must report a race
//   EPCOMM_PLANT_SHUFFLE_AS_FENCE order the warp with a shuffle instead of __syncwarp: TSAN must report a race
//   EPCOMM_PLANT_SKIP_HEAD_UPDATE the receiver never frees slots: the sender spins, the watchdog must fire

#include <cstdint>

#include "../../common/compat.cuh"
#include "../../common/ptx.cuh"

namespace epcomm::test {

inline constexpr int kRingSlotInts = 32;  // one int per lane

struct RingChannel {
  int* slots;  // [num_slots][kRingSlotInts], in the receiver's memory
  int* head;   // messages consumed; written by the receiver
  int* tail;   // messages published; written by the sender
  int num_slots;
};

EPCOMM_HOST_DEVICE int ring_payload(int message_idx, int lane, int seed) {
  return (message_idx * 131 + lane * 7 + seed) & 0xffff;
}

// One warp sends `num_messages` messages.
EPCOMM_DEVICE void ring_send(RingChannel channel, int num_messages, int seed) {
  int const lane = int(ptx::get_lane_id());
  for (int message_idx = 0; message_idx < num_messages; ++message_idx) {
    // Wait for a free slot
    if (lane == 0) {
      while (message_idx - ptx::ld_acquire_sys_global(channel.head) >= channel.num_slots) {
      }
    }
    __syncwarp();
    // Fill the slot
    int const slot_idx = message_idx % channel.num_slots;
    channel.slots[slot_idx * kRingSlotInts + lane] = ring_payload(message_idx, lane, seed);
    __syncwarp();
    // Publish the tail
    if (lane == 0) {
#if defined(EPCOMM_PLANT_RELAXED_TAIL)
      ptx::st_relaxed_sys_global(channel.tail, message_idx + 1);
#else
      ptx::st_release_sys_global(channel.tail, message_idx + 1);
#endif
    }
  }
}

// One warp receives `num_messages` messages; returns (in every lane) the
// number of payload mismatches plus the warp's payload sum in the upper bits.
EPCOMM_DEVICE long long ring_receive(RingChannel channel, int num_messages, int seed) {
  int const lane = int(ptx::get_lane_id());
  long long sum = 0;
  int mismatches = 0;
  for (int message_idx = 0; message_idx < num_messages; ++message_idx) {
    // Wait for the message
    int tail = 0;
    if (lane == 0) {
      do {
        tail = ptx::ld_acquire_sys_global(channel.tail);
      } while (tail <= message_idx);
    }
#if defined(EPCOMM_PLANT_SHUFFLE_AS_FENCE)
    tail = __shfl_sync(0xffffffffu, tail, 0);
#else
    __syncwarp();
#endif
    // Read the slot
    int const slot_idx = message_idx % channel.num_slots;
    int const value = channel.slots[slot_idx * kRingSlotInts + lane];
    mismatches += value != ring_payload(message_idx, lane, seed);
    sum += value;
    __syncwarp();
    // Free the slot
#if !defined(EPCOMM_PLANT_SKIP_HEAD_UPDATE)
    if (lane == 0) ptx::st_release_sys_global(channel.head, message_idx + 1);
#endif
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    mismatches += __shfl_xor_sync(0xffffffffu, mismatches, offset);
  }
  return sum * 1024 + mismatches;
}

// One grid, two roles by block parity: even block b sends on channel b/2, odd block b+1 receives it.
EPCOMM_GLOBAL void ring_blocks_kernel(RingChannel* channels, long long* results, int num_messages, int seed) {
  int const channel_idx = int(blockIdx.x) / 2;
  if (blockIdx.x % 2 == 0) {
    ring_send(channels[channel_idx], num_messages, seed + channel_idx);
  } else {
    long long result = ring_receive(channels[channel_idx], num_messages, seed + channel_idx);
    if (threadIdx.x == 0) results[channel_idx] = result;
  }
}

// One grid per rank. Block b of rank r: warp 0 sends to rank (r+1) % num_ranks on
// that rank's channel b, warp 1 receives from rank (r-1) on its own channel b.
struct RingRankArgs {
  RingChannel* peer_channels;  // the next rank's channels, one per block
  RingChannel* my_channels;    // this rank's channels, one per block
  long long* results;          // one per block
  int rank, num_ranks, num_messages;
};

EPCOMM_HOST_DEVICE int ring_rank_seed(int sender_rank, int block_idx) { return sender_rank * 1000 + block_idx; }

EPCOMM_GLOBAL void ring_ranks_kernel(RingRankArgs args) {
  int const warp_idx = int(threadIdx.x) / 32;
  if (warp_idx == 0) {
    ring_send(args.peer_channels[blockIdx.x], args.num_messages, ring_rank_seed(args.rank, int(blockIdx.x)));
  } else if (warp_idx == 1) {
    int const sender_rank = (args.rank + args.num_ranks - 1) % args.num_ranks;
    long long result =
        ring_receive(args.my_channels[blockIdx.x], args.num_messages, ring_rank_seed(sender_rank, int(blockIdx.x)));
    if (threadIdx.x == 32) args.results[blockIdx.x] = result;
  }
}

}  // namespace epcomm::test
