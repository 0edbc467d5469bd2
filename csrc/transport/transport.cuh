#pragma once
// The device-side transport between nodes: the only way the internode kernels
// move bytes over the network (they never call an RDMA library directly).
//
// Changes since the first version: put_signal now states that the caller orders its lanes'
// writes of the source bytes before the call; reset_signal was added (re-layout).
//
// Model. Every rank owns a symmetric "RDMA buffer": the same size on every
// rank, so an offset names the same place everywhere. Each rank also owns
// `num_signals` 64-bit signal counters that only the transport writes (remote
// adds) and only their owner reads. Senders stage bytes in their own RDMA
// buffer, then put them into a peer's RDMA buffer at the same or another offset.
//
// Concept `Transport` (a trivially copyable struct, passed by value inside a
// kernel's Args; implementations: shm_transport.cuh (CPU sim, and CUDA peer
// memory), gin_transport.cuh (NCCL GIN)). Members, all EPCOMM_DEVICE:
//
//   int rank() const; int num_ranks() const;
//   char* local_buffer() const;
//       this rank's RDMA buffer (stage sends here, read receives here).
//   void put_signal(WarpCoop warp, int peer, size_t dst_offset, size_t src_offset, size_t bytes,
//                   int signal, uint64_t add) const;
//       Warp-collective (every lane calls it with the same arguments; `warp` says who takes part,
//       as NCCL's ncclCoopWarp, and which lane the caller is). Copies [src_offset, +bytes) of this rank's buffer to [dst_offset, +bytes)
//       of `peer`'s, then adds `add` to `peer`'s signal `signal`. Strong: a reader that
//       observes the add also observes these bytes and every earlier put from this rank
//       to `peer`. The source bytes may be overwritten only after flush(). The caller orders
//       its lanes' writes of the source bytes before the call (__syncwarp): lanes may copy
//       words other lanes wrote.
//   void signal_add(WarpCoop warp, int peer, int signal, uint64_t add) const;
//       Warp-collective. Adds to `peer`'s signal, ordered after every earlier put from
//       this rank to `peer` (same strong guarantee, no data).
//   uint64_t read_signal(int signal) const;
//       This rank's signal, with acquire order: data guarded by it may be read after.
//       A sync point on the CPU target, so it may be polled (see wait_at_least).
//   void flush(WarpCoop warp) const;
//       Warp-collective: every put this warp issued has left its source buffer.
//   void reset_signal(int signal) const;
//       Sets this rank's signal to 0. No add to it may be in flight or come before the ranks
//       meet again (the caller makes sure: internode_notify with reset_signals). Signals may
//       outlive the RDMA buffer's contents (GIN keeps them in the communicator), so a re-layout
//       resets them explicitly instead of relying on the buffer being zeroed.
//
// Counting: implementations that can (the CPU one) count the bytes of every put
// by link class (network: peer on another node; nvlink: same node, other rank;
// self), and the puts themselves, so tests can prove what crossed the network and
// in how many messages.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../common/compat.cuh"

namespace epcomm::transport {

// Who takes part in a warp-collective transport call: all 32 lanes of the calling warp (NCCL's
// ncclCoopWarp), each passing its own lane id, which the CPU transport needs to split the work.
struct WarpCoop {
  int lane;
  EPCOMM_HOST_DEVICE int thread_rank() const { return lane; }
  static constexpr int size() { return 32; }
};

// The concept above, checked where a kernel's Args take a Transport (kernels/internode.hpp).
template <class T>
concept DeviceTransport = std::is_trivially_copyable_v<T> && requires(T const t, WarpCoop w, int i, size_t n,
                                                                       uint64_t u) {
  { t.rank() } -> std::same_as<int>;
  { t.num_ranks() } -> std::same_as<int>;
  { t.local_buffer() } -> std::same_as<char*>;
  t.put_signal(w, i, n, n, n, i, u);
  t.signal_add(w, i, i, u);
  { t.read_signal(i) } -> std::same_as<uint64_t>;
  t.flush(w);
  t.reset_signal(i);
};

enum class LinkClass : int { kSelf = 0, kNvlink = 1, kNetwork = 2 };
inline constexpr int kNumLinkClasses = 3;

// Which link a put from `rank` to `peer` uses, with `num_nvl_ranks` ranks per node.
EPCOMM_HOST_DEVICE LinkClass link_class(int rank, int peer, int num_nvl_ranks) {
  if (rank == peer) return LinkClass::kSelf;
  return rank / num_nvl_ranks == peer / num_nvl_ranks ? LinkClass::kNvlink : LinkClass::kNetwork;
}

}  // namespace epcomm::transport
