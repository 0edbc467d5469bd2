#pragma once
// NvlWorkspace: where every region lives in each rank's NVL buffer, computed
// from the shape instead of listed in comments. Every rank uses the same
// layout, so a region of a peer is `peer_buffers[peer] + offset`.
//
//   region             type / shape                             written by        read by
//   abort_flag         int32                                    any failing rank  this rank's spin-waits
//   barrier_signal     int64 [num_ranks (source)]               source (epoch)    this rank (notify)
//   epoch_counter      int64                                    this rank (notify: epoch.cuh)
//   channel_counts     int32 [2 (epoch parity)][num_ranks (source)][num_channels]
//                                                               source (notify)   this rank (notify)
//   expert_counts      int32 [2][num_ranks (source)][num_local_experts]
//   call_headers       CallHeader [2 (epoch parity)][num_ranks (source)]   source (notify)   this rank (notify)
//   ring_head          int32 [num_channels][num_ranks (source)]  this rank (rows consumed)  the source (sender)
//   ring_tail          int32 [num_channels][num_ranks (source)]  the source (rows published) this rank
//   ring_slots         [num_channels][num_ranks (source)][nvl_ring_tokens] x slot
//
// A slot is one row plus its metadata (dispatch); combine uses row + weights:
//   [row bytes, padded to 8][src_idx int32][aux int32][topk_idx int64 x K][topk_weights f32 x K], padded to 16.
// Dispatch and combine share the rings: a barrier (notify) separates them and
// resets the counters of the rank that runs it.

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "call_check.cuh"
#include "config.cuh"

namespace epcomm::kernels {

inline constexpr size_t kRegionAlignment = 128;

EPCOMM_HOST_DEVICE size_t align_up(size_t value, size_t alignment) { return (value + alignment - 1) / alignment * alignment; }

#define EPCOMM_NVL_WORKSPACE_SHAPE_FIELDS(F)                                                             \
  F(int, num_ranks, 1, "ranks sharing the NVL rings (one node)")                                       \
  F(int, num_local_experts, 0, "experts per rank; 0: notify does not exchange per-expert counts")     \
  F(int, num_topk, 0, "K a slot has room for")                                                         \
  F(int, max_row_bytes, 0, "largest of: dispatch row (x + scale bytes), combine row (hidden x element bytes)")
struct NvlWorkspaceShape {
  EPCOMM_NVL_WORKSPACE_SHAPE_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(NvlWorkspaceShape const&) const = default;
};

struct NvlWorkspace {
  int num_ranks = 0, num_channels = 0, num_local_experts = 0, num_topk = 0, ring_tokens = 0;
  size_t row_bytes = 0;  // row region of a slot (max_row_bytes padded to 8)
  size_t slot_bytes = 0;
  size_t abort_flag_offset = 0, barrier_signal_offset = 0, epoch_counter_offset = 0, channel_counts_offset = 0, expert_counts_offset = 0,
         call_headers_offset = 0, ring_head_offset = 0, ring_tail_offset = 0, ring_slots_offset = 0, total_bytes = 0;

  NvlWorkspace() = default;
  EPCOMM_HOST_DEVICE NvlWorkspace(NvlWorkspaceShape const& shape, KernelConfig const& config)
      : num_ranks(shape.num_ranks),
        num_channels(config.num_channels),
        num_local_experts(shape.num_local_experts),
        num_topk(shape.num_topk),
        ring_tokens(config.nvl_ring_tokens) {
    row_bytes = align_up(size_t(shape.max_row_bytes), 8);
    slot_bytes = align_up(row_bytes + 8 + size_t(num_topk) * (sizeof(int64_t) + sizeof(float)), 16);
    size_t offset = 0;
    auto const region = [&](size_t bytes) {
      size_t const start = offset;
      offset = align_up(offset + bytes, kRegionAlignment);
      return start;
    };
    size_t const num_rings = size_t(num_channels) * size_t(num_ranks);
    abort_flag_offset = region(sizeof(int32_t));
    barrier_signal_offset = region(sizeof(int64_t) * size_t(num_ranks));
    epoch_counter_offset = region(sizeof(int64_t));
    channel_counts_offset = region(sizeof(int32_t) * 2 * size_t(num_ranks) * size_t(num_channels));
    expert_counts_offset = region(sizeof(int32_t) * 2 * size_t(num_ranks) * size_t(num_local_experts));
    call_headers_offset = region(sizeof(CallHeader) * 2 * size_t(num_ranks));
    ring_head_offset = region(sizeof(int32_t) * num_rings);
    ring_tail_offset = region(sizeof(int32_t) * num_rings);
    ring_slots_offset = region(slot_bytes * size_t(ring_tokens) * num_rings);
    total_bytes = offset;
  }

  // Bytes each rank's NVL buffer needs (the buffer-size hint of the Python Config).
  EPCOMM_HOST_DEVICE size_t required_bytes() const { return total_bytes; }

  // Bytes [0, counters_end()) are the control regions (flags, counts, head/tail); zero them at allocation.
  EPCOMM_HOST_DEVICE size_t counters_end() const { return ring_slots_offset; }

  EPCOMM_HOST_DEVICE int32_t* abort_flag(void* base) const { return at<int32_t>(base, abort_flag_offset); }
  EPCOMM_HOST_DEVICE int64_t* barrier_signal(void* base, int source) const {
    return at<int64_t>(base, barrier_signal_offset) + source;
  }
  EPCOMM_HOST_DEVICE int64_t* epoch_counter(void* base) const { return at<int64_t>(base, epoch_counter_offset); }
  EPCOMM_HOST_DEVICE int32_t* channel_counts(void* base, int parity, int source) const {
    return at<int32_t>(base, channel_counts_offset) + (size_t(parity) * num_ranks + source) * num_channels;
  }
  EPCOMM_HOST_DEVICE int32_t* expert_counts(void* base, int parity, int source) const {
    return at<int32_t>(base, expert_counts_offset) + (size_t(parity) * num_ranks + source) * num_local_experts;
  }
  EPCOMM_HOST_DEVICE CallHeader* call_header(void* base, int parity, int source) const {
    return at<CallHeader>(base, call_headers_offset) + size_t(parity) * num_ranks + source;
  }
  EPCOMM_HOST_DEVICE int32_t* ring_head(void* base, int channel, int source) const {
    return at<int32_t>(base, ring_head_offset) + size_t(channel) * num_ranks + source;
  }
  EPCOMM_HOST_DEVICE int32_t* ring_tail(void* base, int channel, int source) const {
    return at<int32_t>(base, ring_tail_offset) + size_t(channel) * num_ranks + source;
  }
  EPCOMM_HOST_DEVICE int num_ring_counters() const { return num_channels * num_ranks; }

  // The slot that holds row `row_idx` (counted from 0 since the last barrier) of ring (channel, source).
  EPCOMM_HOST_DEVICE char* slot(void* base, int channel, int source, int row_idx) const {
    size_t const ring = size_t(channel) * num_ranks + source;
    return at<char>(base, ring_slots_offset) + (ring * ring_tokens + size_t(row_idx % ring_tokens)) * slot_bytes;
  }
  // Fields of a slot.
  EPCOMM_HOST_DEVICE int32_t* slot_src_idx(char* slot) const { return reinterpret_cast<int32_t*>(slot + row_bytes); }
  // The int32 after src_idx: unused by intranode; the internode path stores the source node there.
  EPCOMM_HOST_DEVICE int32_t* slot_aux(char* slot) const { return reinterpret_cast<int32_t*>(slot + row_bytes + 4); }
  EPCOMM_HOST_DEVICE int64_t* slot_topk_idx(char* slot) const {
    return reinterpret_cast<int64_t*>(slot + row_bytes + 8);
  }
  EPCOMM_HOST_DEVICE float* slot_topk_weights(char* slot) const {
    return reinterpret_cast<float*>(slot + row_bytes + 8 + sizeof(int64_t) * size_t(num_topk));
  }

 private:
  template <class T>
  EPCOMM_HOST_DEVICE static T* at(void* base, size_t offset) {
    return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
  }
};

}  // namespace epcomm::kernels
