#pragma once
// ShmTransport: the Transport concept (transport.cuh) over plain peer pointers.
// Every rank's RDMA buffer is directly addressable by every other rank: on the
// CPU target all ranks live in one process (tests) or map POSIX shared memory;
// on CUDA the buffers would be IPC-mapped peer memory. Signals are uint64
// counters inside each buffer at `signals_offset` (RdmaWorkspace places them).
//
//   put_signal:  the warp copies 4-byte words into the peer's buffer, __syncwarp,
//                then lane 0 does a release fetch-add on the peer's signal, so an
//                acquiring reader of the signal sees the bytes (strong signal).
//   signal_add:  __syncwarp, then lane 0's release fetch-add.
//   read_signal: acquire load of this rank's signal.
//   flush:       a __syncwarp (copies are synchronous: the source is free at once).
//   reset_signal: a relaxed store of 0 into this rank's signal (the ranks meet before any new add).
//
// Byte counting: when `counters` is set (uint64 [kNumLinkClasses], this rank's),
// lane 0 adds every put's byte count to counters[link class] with a relaxed
// atomic add; when `put_counters` is set, it adds 1 per put (what a network pays
// per message, besides bytes). Signals carry no counted bytes.
//
// Requirements: offsets and byte counts are multiples of 4; signal < num_signals.

#include <cstddef>
#include <cstdint>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "transport.cuh"

namespace epcomm::transport {

struct ShmTransport {
  int rank_ = 0, num_ranks_ = 1, num_nvl_ranks_ = 1;
  char* const* buffers_ = nullptr;  // [num_ranks] RDMA buffer base of every rank, valid in this process
  size_t signals_offset_ = 0;       // where the uint64 signals start in every buffer
  uint64_t* counters_ = nullptr;    // [kNumLinkClasses] bytes put by this rank, or null
  uint64_t* put_counters_ = nullptr;  // [kNumLinkClasses] puts made by this rank, or null

  EPCOMM_DEVICE int rank() const { return rank_; }
  EPCOMM_DEVICE int num_ranks() const { return num_ranks_; }
  EPCOMM_DEVICE char* local_buffer() const { return buffers_[rank_]; }

  EPCOMM_DEVICE void put_signal(WarpCoop warp, int peer, size_t dst_offset, size_t src_offset, size_t bytes,
                                int signal, uint64_t add) const {
    int const lane = warp.thread_rank();
    // Copy the words
    int32_t* dst = reinterpret_cast<int32_t*>(buffers_[peer] + dst_offset);
    int32_t const* src = reinterpret_cast<int32_t const*>(buffers_[rank_] + src_offset);
    int const num_words = int(bytes / 4);
    for (int i = lane; i < num_words; i += 32) dst[i] = src[i];
    count_bytes(lane, peer, bytes);
    // Order every lane's copy before lane 0's release add
    signal_add(warp, peer, signal, add);
  }

  EPCOMM_DEVICE void signal_add(WarpCoop warp, int peer, int signal, uint64_t add) const {
    ptx::syncwarp();
    if (warp.thread_rank() == 0) ptx::atomic_add_release_sys_global(signal_ptr(peer, signal), add);
  }

  EPCOMM_DEVICE uint64_t read_signal(int signal) const { return ptx::ld_acquire_sys_global(signal_ptr(rank_, signal)); }

  EPCOMM_DEVICE void flush(WarpCoop /*warp: puts are synchronous copies*/) const {
    ptx::syncwarp();
  }

  EPCOMM_DEVICE void reset_signal(int signal) const { ptx::st_relaxed_sys_global(signal_ptr(rank_, signal), uint64_t(0)); }

 private:
  EPCOMM_DEVICE uint64_t* signal_ptr(int peer, int signal) const {
    return reinterpret_cast<uint64_t*>(buffers_[peer] + signals_offset_) + signal;
  }
  EPCOMM_DEVICE void count_bytes(int lane, int peer, size_t bytes) const {
    if (lane != 0) return;
    int const link = int(link_class(rank_, peer, num_nvl_ranks_));
    if (counters_ != nullptr)
      atomicAdd(reinterpret_cast<unsigned long long*>(counters_ + link), static_cast<unsigned long long>(bytes));
    if (put_counters_ != nullptr) atomicAdd(reinterpret_cast<unsigned long long*>(put_counters_ + link), 1ull);
  }
};

}  // namespace epcomm::transport
