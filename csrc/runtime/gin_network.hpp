#pragma once
// The cuda runtime's network across nodes: its own NCCL communicator and a GIN session on it
// (gin_setup.hpp), made from an NCCL unique id that rank 0 creates and the Buffer's process group
// carries to every rank (epcomm/backends/cuda_backend.py). Host-only and free of NCCL headers, so
// g++ (bindings) and nvcc (cuda_runtime.cu) can include it; implemented in gin_network.cu, or by
// gin_network_absent.cpp in a build without NCCL's headers (every call then throws kNoDevice).
//
//   rank 0:     NetworkId id = create_network_id();      // then broadcast over the process group
//   every rank: GinNetwork network(id, rank, num_ranks, rdma_bytes, num_signals, timeout_s);  // collective
//               ... kernels get network.transport() by value ...
//               network.close(timeout_s);                // collective, streams synchronized first
//
// Why a communicator of our own rather than the process group's: torch exposes its NCCL communicator
// only through private APIs (ProcessGroupNCCL::getCommPtr / _comm_ptr), and a gloo group has none.
// A unique id over the group's own collectives works for any group.
//
// Deadlines: the communicator is non-blocking (ncclConfig_t.blocking = 0), so every collective NCCL
// call of set-up and teardown is polled against `timeout_s`; a peer that never arrives makes this
// rank abort the communicator (ncclCommAbort) and throw kTimeout instead of waiting forever.
// Errors: kNoDevice when this machine or build cannot do GIN (no NCCL in the build, NCCL older than
// 2.30, no device API or GIN on the communicator: the cause is in the message); kTimeout; kSystem.

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "device_runtime.hpp"

namespace epcomm::transport {
struct GinTransport;
}

namespace epcomm::runtime {

using NetworkId = std::array<uint8_t, kHandleBytes>;  // an ncclUniqueId (NCCL_UNIQUE_ID_BYTES = 128)

// Whether this build has the GIN network (NCCL's headers were found when it was compiled).
bool gin_network_built();

// A fresh NCCL unique id (ncclGetUniqueId): rank 0 makes it, every rank passes it to GinNetwork.
NetworkId create_network_id();

class GinNetwork {
 public:
  // Collective over all `num_ranks` ranks (every node): ncclCommInitRankConfig, then a GinSession of
  // `rdma_bytes` (the RDMA window) and `num_signals` GIN signals, on the CUDA device current on this thread.
  GinNetwork(NetworkId const& id, int rank, int num_ranks, size_t rdma_bytes, int num_signals, double timeout_s);
  ~GinNetwork();  // abort() unless closed: never waits for peers
  GinNetwork(GinNetwork const&) = delete;
  GinNetwork& operator=(GinNetwork const&) = delete;

  // Valid until close() or abort(); trivially copyable, copied into kernel Args.
  transport::GinTransport const& transport() const;
  char* local_buffer() const;  // this rank's RDMA window (device memory)
  size_t rdma_bytes() const;   // the window's size (rounded up to NCCL's window alignment)
  int num_signals() const;
  bool usable() const;         // neither closed nor aborted

  // Collective: GinSession::close, then ncclCommFinalize + ncclCommDestroy. No kernel may still use the
  // transport (synchronize its streams first). On a failure or past timeout_s it aborts instead and throws.
  void close(double timeout_s);
  // Local, never waits for peers: ncclCommAbort, so NCCL's own waits (its proxy, a pending collective)
  // end. The session's window and device communicator are dropped without NCCL calls (freed with the
  // process). What a kernel still running on the transport then does is NCCL's business (assumed: it
  // stops at its own timeout or faults; the CUDA context is to be considered lost either way).
  void abort() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The runtime's network, for kernels that go through it (`what` names them in the error): throws
// kInvalidArgument when open_network was never called or the network was closed or aborted.
inline GinNetwork& usable_network(DeviceRuntime const& runtime, char const* what) {
  GinNetwork* const network = runtime.network();
  if (network == nullptr || !network->usable())
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       std::string(what) + " on the cuda runtime need its GIN network: call open_network first (or it "
                       "was closed or aborted after a host timeout)");
  return *network;
}

// What the GIN bindings of the kernel entries (gin_entries.cu: internode; gin_low_latency_entries.cu: LL)
// share: the runtime's network for one call, checked to have the signals it needs, and the host's give-up.
struct GinBinding {
  GinNetwork* network = nullptr;

  // `what` names the kernels in errors; a session with fewer than `num_signals` signals needs replacing.
  GinNetwork& attach(KernelCall const& call, int num_signals, char const* what) {
    network = &usable_network(call.runtime, what);
    if (num_signals > network->num_signals())
      throw RuntimeError(ErrorCode::kInvalidArgument,
                         std::string(what) + ": this layout needs " + std::to_string(num_signals) + " GIN signals, the "
                         "network session has " + std::to_string(network->num_signals()) + " (a new session is needed)");
    return *network;
  }

  // The host stopped waiting for a grid that may still be inside NCCL (a put or flush towards a dead peer):
  // abort the communicator so NCCL's own waits end; the backend is unusable from here on.
  void host_gave_up() {
    if (network != nullptr) network->abort();
  }
};

}  // namespace epcomm::runtime
