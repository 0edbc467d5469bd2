#pragma once
// The sending side of one network ring (rdma_workspace.cuh): row slots in a peer's RDMA buffer,
// handed back as credits on a head signal of this rank. Counts are of all time (signals only grow);
// between kernels this rank keeps the count it has sent at the head signal's base in its own buffer.
//
//   NetworkRingSender ring(transport, rdma, head_signal, ring_tokens);   // continues the saved count
//   if (!ring.reserve(context, transport, rows, wait_rows, lane)) return;  // credits for `rows` more
//   ... stage rows ring.sent + i, transport.put_signal(...) each with the ring's tail signal += 1 ...
//   ring.advance(rows);
//   ring.save(lane);                                                      // for the next kernel
//
// Used by internode_dispatch (network senders: one row at a time, credits a chunk at a time) and
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

  EPCOMM_DEVICE void advance(int rows) { sent += uint64_t(rows); }

  // Lane 0 stores the count for the next kernel on this ring.
  EPCOMM_DEVICE void save(int lane) const {
    if (lane == 0) *saved = sent;
  }
};

}  // namespace epcomm::kernels
