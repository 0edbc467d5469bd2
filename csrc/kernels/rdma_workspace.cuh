#pragma once
// RdmaWorkspace: where every region lives in each rank's symmetric RDMA buffer
// (the same layout on every rank, so an offset names the same place in a
// peer's buffer). The internode path also uses an NVL buffer per rank laid out
// by NvlWorkspace with num_ranks = ranks per node (L); see internode.hpp.
// N = num_nodes, L = num_nvl_ranks, R = N * L, C = num_channels, T = rdma_ring_tokens.
//
//   region              type / shape                          written by                    read by
//   signals             uint64 [num_signals()]                the transport (remote adds)   this rank
//     barrier           [R (source rank)]                     source: +1 per notify         this rank (notify)
//     dispatch_tail     [C][N (source node)]                  network sender: +rows         forwarder
//     dispatch_head     [C][N (destination node)]             forwarder coordinator: +freed network sender
//     combine_tail      [C][N (forwarding node)]              combine forwarder: +rows      combine receiver
//     combine_head      [C][N (destination node)]             combine receiver: +freed      combine forwarder
//     abort             [1]                                   any failing rank: +1          this rank's watcher
//   signal_bases        uint64 [num_signals()]                this rank only: the value each ring signal
//                                                             had reached when the last kernel ended
//   counts              int32 [2 (epoch parity)][R (source)][count_message_ints]   put by remote sources
//   count_staging       int32 [R (destination)][count_message_ints]                this rank, then put
//   finished_warps      int32: warps of this rank's running kernel that finished      its watcher (local)
//   forwarder_progress  int32 [C][L]: network rows forwarder warp p passed (this  the coordinator (local;
//                       kernel); reset to 0 by the coordinator at the end          never crosses the network)
//   dispatch_staging    [C][N (destination node)][T] x dispatch slot               network sender
//   dispatch_rings      [C][N (source node)][T] x dispatch slot                    put by (source node, same local rank)
//   combine_staging     [C][N (destination node)][T] x combine slot                combine forwarder
//   combine_rings       [C][N (forwarding node)][T] x combine slot                 put by (forwarding node, same local rank)
//
// Ring signals only grow (no one resets them): a ring's row i of all time sits in
// slot i % T; a kernel starts from signal_bases and stores the new totals at its end.
// Within a ring, slots are packed at the call's stride (dispatch_stride, combine_stride: what one row puts,
// rounded up only as far as the slot's fields need), not at the largest slot the region is sized for, so a
// run of consecutive rows that does not wrap is one contiguous range of bytes: one put and one signal add for
// the run (a chunk), and the bytes on the wire are exactly the rows' (no padding crosses the network).
// The stride may change from one call to the next (row bytes, partial dtype), so row r + T of a later call
// need not land on row r's bytes: what keeps a new row from overwriting an unread old one is the barrier (a
// notify) before every data kernel, after which every ring is drained, not the credits alone. A staging slot
// is rewritten once its row's credit came back: a put whose signal add the peer observed has left its source.
//
// Count message (source s -> destination d), int32, padded to 16 bytes:
//   [4]  the call header (call_check.cuh; a notify without counts puts only these 16 bytes)
//   [C]  tokens of s's channel c that go to rank d
//   [C]  tokens of s's channel c that go to node(d) (used when d is s's forwarder there)
//   [num_local_experts]  tokens of s that chose each of d's experts
// Dispatch slot: [src_idx int32][peer_mask uint32][topk_idx int64 x K][topk_weights f32 x K][row bytes]
//   (record_bytes + row bytes are put; the stride is that rounded up to 8, for the int64 ids, so rows
//   whose bytes are a multiple of 8 pack exactly and travel in runs; others travel one per put).
// Combine slot: [topk_weights f32 x K][pad to 16][partial x hidden], the partial in the call's
//   node_partial_kind (the rows' dtype or fp32: the region has room for fp32); the put and the stride
//   stop after the partial, so bf16 partials cross the network in half the bytes.

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "call_check.cuh"
#include "config.cuh"
#include "workspace.cuh"

namespace epcomm::kernels {

// Limits of the internode kernels, with the reason for each.
inline constexpr int kMaxNodes = 32;                 // one network-sender warp per node; node masks are 32 bits
inline constexpr int kMaxInternodeNvlRanks = 31;     // forwarder block: one warp per NVLink peer + a coordinator
inline constexpr int kDefaultMaxNodesPerToken = 4;   // routing bound the Python layer enforces by default

#define EPCOMM_INTERNODE_CONFIG_FIELDS(F)                                                   \
  F(KernelConfig, nvl, {}, "NVLink side: channels, NVL chunk and ring (as intranode)")      \
  F(int, rdma_chunk_tokens, 2, "network slots a sender waits for at once")                 \
  F(int, rdma_ring_tokens, 8, "slots per (channel, node) network ring")
struct InternodeConfig {
  EPCOMM_INTERNODE_CONFIG_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(InternodeConfig const&) const = default;
};

#define EPCOMM_RDMA_WORKSPACE_SHAPE_FIELDS(F)                                                  \
  F(int, num_nodes, 1, "NN")                                                                 \
  F(int, num_nvl_ranks, 1, "L, ranks per node")                                              \
  F(int, num_local_experts, 0, "experts per rank; 0: no per-expert counts")                  \
  F(int, num_topk, 0, "K a record has room for")                                             \
  F(int, max_row_bytes, 0, "largest dispatch row: x bytes + scale bytes")                    \
  F(int, hidden, 0, "combine row elements (slots have room for fp32 node partials)")        \
  F(int, max_nodes_per_token, kDefaultMaxNodesPerToken, "the routing's bound the rings are sized for")
struct RdmaWorkspaceShape {
  EPCOMM_RDMA_WORKSPACE_SHAPE_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(RdmaWorkspaceShape const&) const = default;
};

// nullptr when usable, else a static message naming the value and the rule.
EPCOMM_HOST_DEVICE char const* validate_rdma_shape(RdmaWorkspaceShape const& shape, InternodeConfig const& config) {
  if (shape.num_nodes < 1 || shape.num_nodes > kMaxNodes) return "num_nodes must be in [1, 32] (node masks are 32 bits)";
  if (shape.num_nvl_ranks < 1 || shape.num_nvl_ranks > kMaxNvlRanks)
    return "num_nvl_ranks must be in [1, 32] (peer masks are 32 bits)";
  if (shape.max_nodes_per_token < 1 || shape.max_nodes_per_token > shape.num_nodes)
    return "max_nodes_per_token must be in [1, num_nodes]";
  if (shape.num_topk < 0 || shape.num_local_experts < 0) return "num_topk and num_local_experts must be >= 0";
  if (shape.max_row_bytes < 0 || shape.max_row_bytes % 4 != 0) return "max_row_bytes must be a multiple of 4";
  if (shape.hidden < 0) return "hidden must be >= 0";
  if (char const* problem = validate_config(config.nvl, shape.num_nvl_ranks)) return problem;
  if (config.rdma_chunk_tokens < 1) return "rdma_chunk_tokens must be >= 1";
  if (config.rdma_ring_tokens < config.rdma_chunk_tokens)
    return "rdma_ring_tokens must be >= rdma_chunk_tokens (a sender waits for a chunk of free slots)";
  return nullptr;
}

struct RdmaWorkspace {
  int num_nodes = 0, num_nvl_ranks = 0, num_ranks = 0, num_channels = 0, ring_tokens = 0;
  int num_local_experts = 0, num_topk = 0, hidden = 0, max_nodes_per_token = 0;
  int count_message_ints = 0;
  size_t record_bytes = 0, dispatch_row_bytes = 0, dispatch_slot_bytes = 0, combine_slot_bytes = 0;
  size_t signals_offset = 0, signal_bases_offset = 0, counts_offset = 0, count_staging_offset = 0, finished_warps_offset = 0, forwarder_progress_offset = 0,
         dispatch_staging_offset = 0, dispatch_rings_offset = 0, combine_staging_offset = 0,
         combine_rings_offset = 0, total_bytes = 0;

  RdmaWorkspace() = default;
  EPCOMM_HOST_DEVICE RdmaWorkspace(RdmaWorkspaceShape const& shape, InternodeConfig const& config)
      : num_nodes(shape.num_nodes),
        num_nvl_ranks(shape.num_nvl_ranks),
        num_ranks(shape.num_nodes * shape.num_nvl_ranks),
        num_channels(config.nvl.num_channels),
        ring_tokens(config.rdma_ring_tokens),
        num_local_experts(shape.num_local_experts),
        num_topk(shape.num_topk),
        hidden(shape.hidden),
        max_nodes_per_token(shape.max_nodes_per_token) {
    count_message_ints = int(align_up(size_t(kCallHeaderInts + 2 * num_channels + num_local_experts), kCallHeaderInts));
    record_bytes = align_up(8 + size_t(num_topk) * (sizeof(int64_t) + sizeof(float)), 8);
    dispatch_row_bytes = size_t(shape.max_row_bytes);
    dispatch_slot_bytes = align_up(record_bytes + dispatch_row_bytes, 16);
    combine_slot_bytes = align_up(combine_partial_offset() + sizeof(float) * size_t(hidden), 16);
    size_t offset = 0;
    auto const region = [&](size_t bytes) {
      size_t const start = offset;
      offset = align_up(offset + bytes, kRegionAlignment);
      return start;
    };
    size_t const ring_slots = size_t(num_channels) * size_t(num_nodes) * size_t(ring_tokens);
    size_t const message_bytes = sizeof(int32_t) * size_t(count_message_ints);
    signals_offset = region(sizeof(uint64_t) * size_t(num_signals()));
    signal_bases_offset = region(sizeof(uint64_t) * size_t(num_signals()));
    counts_offset = region(2 * size_t(num_ranks) * message_bytes);
    count_staging_offset = region(size_t(num_ranks) * message_bytes);
    finished_warps_offset = region(sizeof(int32_t));
    forwarder_progress_offset = region(sizeof(int32_t) * size_t(num_channels) * size_t(num_nvl_ranks));
    dispatch_staging_offset = region(ring_slots * dispatch_slot_bytes);
    dispatch_rings_offset = region(ring_slots * dispatch_slot_bytes);
    combine_staging_offset = region(ring_slots * combine_slot_bytes);
    combine_rings_offset = region(ring_slots * combine_slot_bytes);
    total_bytes = offset;
  }

  // Bytes every rank's RDMA buffer needs.
  EPCOMM_HOST_DEVICE size_t required_bytes() const { return total_bytes; }
  // Bytes [0, counters_end()) hold signals, bases and counts; zero them at allocation.
  EPCOMM_HOST_DEVICE size_t counters_end() const { return dispatch_staging_offset; }

  // Signal indices.
  EPCOMM_HOST_DEVICE int num_signals() const { return num_ranks + 4 * num_channels * num_nodes + 1; }
  EPCOMM_HOST_DEVICE int abort_signal() const { return num_ranks + 4 * num_channels * num_nodes; }
  EPCOMM_HOST_DEVICE int barrier_signal(int source) const { return source; }
  EPCOMM_HOST_DEVICE int dispatch_tail_signal(int channel, int node) const { return ring_signal(0, channel, node); }
  EPCOMM_HOST_DEVICE int dispatch_head_signal(int channel, int node) const { return ring_signal(1, channel, node); }
  EPCOMM_HOST_DEVICE int combine_tail_signal(int channel, int node) const { return ring_signal(2, channel, node); }
  EPCOMM_HOST_DEVICE int combine_head_signal(int channel, int node) const { return ring_signal(3, channel, node); }
  // This rank's record of where signal `signal` stood when the last kernel ended.
  EPCOMM_HOST_DEVICE uint64_t* signal_base(char* local_buffer, int signal) const {
    return reinterpret_cast<uint64_t*>(local_buffer + signal_bases_offset) + signal;
  }

  // Count messages.
  EPCOMM_HOST_DEVICE size_t count_message_offset(int parity, int source) const {
    return counts_offset + (size_t(parity) * num_ranks + source) * sizeof(int32_t) * count_message_ints;
  }
  EPCOMM_HOST_DEVICE size_t count_staging_message_offset(int destination) const {
    return count_staging_offset + size_t(destination) * sizeof(int32_t) * count_message_ints;
  }
  EPCOMM_HOST_DEVICE size_t count_message_bytes() const { return sizeof(int32_t) * size_t(count_message_ints); }
  // A message's parts: the call header, then the counts (channel, node, expert) from kCallHeaderInts.
  EPCOMM_HOST_DEVICE static CallHeader* message_call_header(char* message) { return reinterpret_cast<CallHeader*>(message); }
  EPCOMM_HOST_DEVICE static int32_t* message_counts(char* message) {
    return reinterpret_cast<int32_t*>(message) + kCallHeaderInts;
  }

  EPCOMM_HOST_DEVICE int32_t* finished_warps(char* local_buffer) const {
    return reinterpret_cast<int32_t*>(local_buffer + finished_warps_offset);
  }
  EPCOMM_HOST_DEVICE int32_t* forwarder_progress(char* local_buffer, int channel, int peer) const {
    return reinterpret_cast<int32_t*>(local_buffer + forwarder_progress_offset) + size_t(channel) * num_nvl_ranks + peer;
  }

  // Ring slots: `row` counts rows of the ring over all time; `stride` is the call's (dispatch_stride,
  // combine_stride), the same on both ends of a ring.
  EPCOMM_HOST_DEVICE size_t dispatch_staging_slot(int channel, int node, uint64_t row, size_t stride) const {
    return dispatch_staging_offset + ring_start(channel, node) * dispatch_slot_bytes + ring_position(row) * stride;
  }
  EPCOMM_HOST_DEVICE size_t dispatch_ring_slot(int channel, int node, uint64_t row, size_t stride) const {
    return dispatch_rings_offset + ring_start(channel, node) * dispatch_slot_bytes + ring_position(row) * stride;
  }
  EPCOMM_HOST_DEVICE size_t combine_staging_slot(int channel, int node, uint64_t row, size_t stride) const {
    return combine_staging_offset + ring_start(channel, node) * combine_slot_bytes + ring_position(row) * stride;
  }
  EPCOMM_HOST_DEVICE size_t combine_ring_slot(int channel, int node, uint64_t row, size_t stride) const {
    return combine_rings_offset + ring_start(channel, node) * combine_slot_bytes + ring_position(row) * stride;
  }
  // Bytes of a dispatch slot that travel (record + the row actually used), and the call's stride (<= the
  // slot bytes the region is sized for, as row_bytes <= max_row_bytes).
  EPCOMM_HOST_DEVICE size_t dispatch_put_bytes(int row_bytes) const { return record_bytes + size_t(row_bytes); }
  EPCOMM_HOST_DEVICE size_t dispatch_stride(int row_bytes) const { return align_up(dispatch_put_bytes(row_bytes), 8); }
  EPCOMM_HOST_DEVICE size_t combine_put_bytes(int partial_element_bytes) const {
    return combine_partial_offset() + size_t(partial_element_bytes) * size_t(hidden);
  }
  // A multiple of 4 (internode_combine's validation requires 4-byte partials), which is all the weights and
  // partials need.
  EPCOMM_HOST_DEVICE size_t combine_stride(int partial_element_bytes) const {
    return combine_put_bytes(partial_element_bytes);
  }

  // Fields of a dispatch slot.
  EPCOMM_HOST_DEVICE static int32_t* record_src_idx(char* slot) { return reinterpret_cast<int32_t*>(slot); }
  EPCOMM_HOST_DEVICE static uint32_t* record_peer_mask(char* slot) { return reinterpret_cast<uint32_t*>(slot + 4); }
  EPCOMM_HOST_DEVICE static int64_t* record_topk_idx(char* slot) { return reinterpret_cast<int64_t*>(slot + 8); }
  EPCOMM_HOST_DEVICE float* record_topk_weights(char* slot) const {
    return reinterpret_cast<float*>(slot + 8 + sizeof(int64_t) * size_t(num_topk));
  }
  EPCOMM_HOST_DEVICE char* record_row(char* slot) const { return slot + record_bytes; }
  // Fields of a combine slot.
  EPCOMM_HOST_DEVICE static float* combine_weights(char* slot) { return reinterpret_cast<float*>(slot); }
  EPCOMM_HOST_DEVICE size_t combine_partial_offset() const { return align_up(sizeof(float) * size_t(num_topk), 16); }
  EPCOMM_HOST_DEVICE char* combine_partial(char* slot) const { return slot + combine_partial_offset(); }

 private:
  EPCOMM_HOST_DEVICE int ring_signal(int kind, int channel, int node) const {
    return num_ranks + (kind * num_channels + channel) * num_nodes + node;
  }
  // The first slot of ring (channel, node) in slots of the region's size, and row `row`'s place in its ring.
  EPCOMM_HOST_DEVICE size_t ring_start(int channel, int node) const {
    return (size_t(channel) * num_nodes + node) * ring_tokens;
  }
  EPCOMM_HOST_DEVICE size_t ring_position(uint64_t row) const { return size_t(row % uint64_t(ring_tokens)); }
};

}  // namespace epcomm::kernels
