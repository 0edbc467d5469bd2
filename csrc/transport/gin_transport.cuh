#pragma once
// GinTransport: the Transport concept (transport.cuh) over NCCL's device API with GIN
// (GPU-initiated networking). CUDA only; the CPU target uses shm_transport.cuh.
//
// Backends. Calls go through `ncclGin`, which picks the backend of the communicator's GIN
// connection at run time, so one binary serves GDAKI (the GPU writes the NIC's work requests
// and rings its doorbell itself: a DOCA-GPUNetIO-capable NIC and driver) and the CPU proxy (the
// GPU queues descriptors that an NCCL proxy thread posts to the NIC). NCCL 2.30's
// third backend, GPI, is compiled out (see below); host set-up (runtime/gin_setup.cu) refuses a
// communicator with no GIN or with a GPI connection, with what to do instead.
//
// Not verified: written against the NCCL 2.30.7 headers and compiled for sm_90 (make
// gin-check); never run, since the development machines have no GPU and no NIC. In
// particular unverified: puts to self (NCCL's device API guide allows a loopback peer) and to
// same-node peers through GIN, the starting value of the signals after ncclDevCommCreate
// (assumed 0), and the cost of every warp sharing one GIN context (NCCL advises cycling
// contexts for bandwidth; the put_signal mapping below says why this transport cannot).
//
// Why GIN and not NVSHMEM: NCCL's device API is header-only and inline (plain nvcc, no -rdc,
// no device link), links with -l:libnccl.so.2 that torch already ships, and reuses the process
// group's own ncclComm_t instead of bootstrapping a second runtime.
//
// Mapping (NCCL header lines cited from nccl_device/gin.h, 2.30.7):
//   put_signal  ncclGin::put(world, peer, window, dst, window, src, bytes,
//                            ncclGin_StrongSignalAdd{signal, add}, ncclGin_None, ncclCoopWarp)
//               "For strong signals: guarantees this put AND all preceding puts on this
//               context to the same peer are settled" (gin.h:236-237). The guarantee spans one
//               GIN context, so a GinTransport issues everything on a single context: then
//               "every earlier put from this rank to peer" of the concept holds.
//   signal_add  ncclGin::signal(world, peer, ncclGin_StrongSignalAdd{...}, ncclCoopWarp)
//               "Strong add signal: visibility implies all preceding puts are settled" (gin.h:58).
//   read_signal ncclGin::readSignal(id, 64, memory_order_acquire) (gin.h:343-345): an acquire
//               load through cuda::atomic_ref<uint64_t>, whose default scope is system (see
//               read_signal below), so no extra fence.
//   reset_signal ncclGin::resetSignal(id): "Sets signal and shadow to zero. May not race with
//               concurrent modifcations to signal." (gin.h:376-377); the caller guarantees that.
//   flush       ncclGin::flush(ncclCoopWarp, memory_order_acquire): "All source buffers from
//               put's from any thread in this coop will be safe to reuse" (gin.h:310-311).
//               It does not make data visible at the peer; the signals do that.
//
// Coop: ncclCoopWarp (= ncclCoopTile<32>, coop.h:105): the whole warp takes part, lane 0
// (hardware %laneid) issues the work request, and put/signal/flush bracket it with __syncwarp,
// which also orders the lanes' earlier writes to the source rows before the request. The
// backends then release at device scope at least (gin_gdaki.h:93 "DOCA guarantees SCOPE_GPU";
// the proxy fences at system scope, gin_proxy.h:218-220), enough for a device-memory buffer.
// Flush spreads the peers over the 32 lanes. So all 32 lanes must call, converged, with the same
// arguments, as the concept already requires; WarpCoop says so (as ncclCoopWarp), its lane is unused
// (NCCL reads %laneid itself).

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../common/compat.cuh"
#include "transport.cuh"

#if !EPCOMM_TARGET_CUDA
#error "gin_transport.cuh needs nvcc (NCCL's GIN device API); the CPU target uses shm_transport.cuh"
#endif

// GDAKI and proxy only: NCCL 2.30's GPI backend fences through a store to a local dummy, which
// gives every kernel a stack frame, and a narrower ncclGin_BackendMask<...> does not compile (its
// signal helpers take `ncclGin const&`). gin_device_common.h reads this switch once per
// translation unit, so no NCCL device header may come before this one.
#if defined(_NCCL_GIN_DEVICE_COMMON_H_)
#error "include gin_transport.cuh before any NCCL device header (it switches the GPI backend off)"
#endif
#ifndef NCCL_GIN_GPI_ENABLE
#define NCCL_GIN_GPI_ENABLE 0
#endif
#include <nccl_device.h>

namespace epcomm::transport {

// Trivially copyable: it travels by value inside a kernel's Args. Filled by
// runtime::GinSession (runtime/gin_setup.cu); every field is set there.
struct GinTransport {
  static constexpr int kMaxBlockWarps = 16;  // NCCL's GIN calls need > 64 registers: 512-thread blocks get 128

  // ncclGin keeps a reference to its ncclDevComm (gin.h:206) and indexes its arrays by
  // connection at run time, so the 240-byte communicator must sit in addressable memory. A
  // by-value member works while the transport stays a kernel parameter, but any local copy of
  // it (measured: 280-byte stack frame) puts it on the stack; so this points to a device copy
  // made at set-up, and the transport stays 48 bytes of scalars.
  ncclDevComm const* dev_comm;
  ncclWindow_t window;       // the symmetric RDMA buffer, registered with NCCL_WIN_COLL_SYMMETRIC
  char* buffer;              // this rank's RDMA buffer (the window's local address)
  int my_rank, world_size;   // world ranks; peers are world ranks too
  int context_index;         // the one GIN context every put uses (see the header note)
  ncclGinSignal_t signal_base;  // transport signal s is GIN signal signal_base + s
  int num_signals;

  EPCOMM_DEVICE int rank() const { return my_rank; }
  EPCOMM_DEVICE int num_ranks() const { return world_size; }
  EPCOMM_DEVICE char* local_buffer() const { return buffer; }

  EPCOMM_DEVICE void put_signal(WarpCoop /*warp: ncclCoopWarp*/, int peer, size_t dst_offset, size_t src_offset,
                                size_t bytes, int signal, uint64_t add) const {
    gin().put(world(), peer, window, dst_offset, window, src_offset, bytes,
              ncclGin_StrongSignalAdd{signal_id(signal), add}, ncclGin_None{}, ncclCoopWarp{});
  }

  EPCOMM_DEVICE void signal_add(WarpCoop /*warp: ncclCoopWarp*/, int peer, int signal, uint64_t add) const {
    gin().signal(world(), peer, ncclGin_StrongSignalAdd{signal_id(signal), add}, ncclCoopWarp{});
  }

  // Acquire at system scope, without a fence of our own: gin.h:344-345 declares the load with
  // memory_order_acquire, and impl/gin__funcs.h:851 implements it as
  // cuda::atomic_ref<uint64_t>{*sig.ptr}.load(ord), whose scope defaults to thread_scope_system
  // (cccl cuda/__atomic/atomic.h). That is what the NIC's (or the proxy's) writes need: the
  // strong signal is only visible once the guarded bytes have settled in this GPU's memory,
  // and the system-scope acquire keeps this thread's later loads after it. Cheap enough to poll.
  EPCOMM_DEVICE uint64_t read_signal(int signal) const {
    return gin().readSignal(signal_id(signal), 64, cuda::memory_order_acquire);
  }

  EPCOMM_DEVICE void flush(WarpCoop /*warp: ncclCoopWarp*/) const {
    gin().flush(ncclCoopWarp{}, cuda::memory_order_acquire);
  }

  EPCOMM_DEVICE void reset_signal(int signal) const { gin().resetSignal(signal_id(signal)); }

  // internal:
  // A fresh ncclGin per call: it is a few loads from *dev_comm and holds a reference, so it
  // cannot be a member of a trivially copyable struct.
  EPCOMM_DEVICE ncclGin gin() const { return ncclGin(*dev_comm, context_index); }
  // The world team, built from our own fields; ncclTeamWorld(comm) gives the same (stride 1).
  EPCOMM_DEVICE ncclTeam world() const { return ncclTeam{world_size, my_rank, 1}; }
  EPCOMM_DEVICE ncclGinSignal_t signal_id(int signal) const { return signal_base + ncclGinSignal_t(signal); }
};

static_assert(std::is_trivially_copyable_v<GinTransport>, "GinTransport travels by value in kernel Args");

}  // namespace epcomm::transport
