#pragma once
// The sending side of one network ring (rdma_workspace.cuh): row slots in a peer's RDMA buffer,
// handed back as credits on a head signal of this rank. Counts are of all time (signals only grow);
// between kernels this rank keeps the count it has sent at the head signal's base in its own buffer.
//
//   NetworkRingSender ring(transport, rdma, head_signal, ring_tokens);   // continues the saved count
//   if (!ring.reserve(context, transport, rows, wait_rows, lane)) return;  // credits for `rows` more
//   ... stage rows ring.sent + i; put_ring_run(...) for each run of them that does not wrap
//       (ring.rows_to_wrap), with the ring's tail signal += the run's rows ...
//   ring.advance(rows);
//   ring.save(lane);                                                      // for the next kernel
//
// Used by internode_dispatch (network senders: rows staged one at a time, put a chunk at a time) and
// internode_combine (forwarders: a batch of partials at a time).

#include <cstdint>

#include "../common/compat.cuh"
#include "internode_common.cuh"
#include "rdma_workspace.cuh"

namespace epcomm::kernels {

template <class Transport>
struct NetworkRingSender {
  uint64_t* saved;       // this rank's copy of the row count (RdmaWorkspace::signal_base of head_signal)
  int head_signal;       // this rank's signal the receiver adds freed slots to
  int ring_tokens;       // slots in the ring
  uint64_t sent;         // rows of this ring of all time
  uint64_t slot_limit;   // rows [.., slot_limit) may be written

  EPCOMM_DEVICE NetworkRingSender(Transport const& transport, RdmaWorkspace const& rdma, int head_signal_,
                                  int ring_tokens_)
      : saved(rdma.signal_base(transport.local_buffer(), head_signal_)),
        head_signal(head_signal_),
        ring_tokens(ring_tokens_),
        sent(*saved),
        slot_limit(0) {}

  // Warp-collective: rows [sent, sent + rows) get free slots; when it has to wait, it waits until
  // `wait_rows` (>= rows, <= ring_tokens) are free at once (a chunk). False after a failed wait (reported).
  EPCOMM_DEVICE bool reserve(WaitContext const& context, Transport const& transport, int rows, int wait_rows,
                             int lane) {
    if (sent + uint64_t(rows) <= slot_limit) return true;
    uint64_t const end = sent + uint64_t(wait_rows);
    uint64_t const wanted = end > uint64_t(ring_tokens) ? end - uint64_t(ring_tokens) : 0;
    uint64_t head = 0;
    if (!warp_wait_signal(context, transport, head_signal, wanted, lane, &head)) return false;
    slot_limit = head + uint64_t(ring_tokens);
    return true;
  }

  // Whether rows [sent, sent + rows) have slots without waiting.
  EPCOMM_DEVICE bool has_room(int rows) const { return sent + uint64_t(rows) <= slot_limit; }

  EPCOMM_DEVICE void advance(int rows) { sent += uint64_t(rows); }

  // Rows from `row` to the ring's last slot: consecutive rows are contiguous up to there.
  EPCOMM_DEVICE int rows_to_wrap(uint64_t row) const { return ring_tokens - int(row % uint64_t(ring_tokens)); }

  // Lane 0 stores the count for the next kernel on this ring.
  EPCOMM_DEVICE void save(int lane) const {
    if (lane == 0) *saved = sent;
  }
};

// Warp-collective: one put for `rows` consecutive ring rows that do not wrap, staged from byte `staging` of this
// rank's buffer, landing from byte `ring` of `peer`'s, `stride` bytes apart, the last one `row_bytes` long (so
// rows travel without the padding after the last; runs of more than one row need row_bytes == stride); then the
// peer's `tail_signal` += rows. Orders the lanes' staging writes before the put.
template <class Transport>
EPCOMM_DEVICE void put_ring_run(Transport const& transport, int lane, int peer, size_t ring, size_t staging, int rows,
                                size_t stride, size_t row_bytes, int tail_signal) {
  ptx::syncwarp();
  transport.put_signal(WarpCoop{lane}, peer, ring, staging, size_t(rows - 1) * stride + row_bytes, tail_signal,
                       uint64_t(rows));
}

}  // namespace epcomm::kernels
