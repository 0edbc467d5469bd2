#pragma once
// Host side of the GIN transport (transport/gin_transport.cuh): what one rank does to turn an
// NCCL communicator into a GinTransport, and back. Implemented in gin_setup.cu (nvcc, no torch).
//
//   GinSession session(comm, buffer_bytes, num_signals);  // collective over comm
//   kernel_args.transport = session.transport();          // by value into the kernel's Args
//   ... launch, synchronize ...
//   session.close();                                      // collective; the destructor does it too
//
// Where the communicator comes from: the cuda runtime makes its own from an NCCL unique id carried
// over the Buffer's process group (gin_network.hpp: no private torch API, any group). The session
// borrows it: the communicator must outlive the session.
//
// Deadlines: with a non-blocking communicator (ncclConfig_t.blocking = 0) NCCL answers ncclInProgress
// and the call settles later; `timeout_s` > 0 bounds that wait (RuntimeError kTimeout naming the call),
// so a peer that never makes the matching collective call cannot hold this rank forever.
//
// Errors throw RuntimeError (device_runtime.hpp; a std::runtime_error) naming the failed call,
// NCCL's description, and what to do; ErrorCode::kNoDevice when this communicator cannot do GIN.
// All ranks must make the same calls with the same arguments: a rank that throws half-way leaves
// its peers waiting inside a collective NCCL call.
//
// Host-only; needs nccl.h (and so the CUDA include path) but no NCCL device header.

#include <nccl.h>

#include <cstddef>
#include <memory>
#include <string>

#include "device_runtime.hpp"

namespace epcomm::transport {
struct GinTransport;
}

namespace epcomm::runtime {

// A non-blocking communicator answers ncclInProgress first; the call's real outcome is then the
// communicator's async error once it settles. Polls for it (poll_until) and returns it; past `deadline`
// returns ncclInProgress still (the caller names the call and aborts the communicator).
ncclResult_t settle_nccl(ncclComm_t comm, ncclResult_t result, HostClock::time_point deadline = HostClock::time_point::max());
// "<call> failed with <NCCL's words> (ncclResult_t N): <NCCL's last error>".
std::string nccl_problem(ncclComm_t comm, char const* call, ncclResult_t result);

class GinSession {
 public:
  // Collective over `comm`. Allocates and registers a symmetric RDMA buffer of `buffer_bytes`
  // (rounded up to NCCL_WIN_REQUIRED_ALIGNMENT, zeroed) and a device communicator with
  // `num_signals` GIN signals and one GIN context.
  // timeout_s > 0: how long each collective call may take to settle (see above); 0: no limit.
  GinSession(ncclComm_t comm, size_t buffer_bytes, int num_signals, double timeout_s = 0);
  ~GinSession();  // close() if still open, without throwing
  GinSession(GinSession const&) = delete;
  GinSession& operator=(GinSession const&) = delete;

  // Valid until close(). Trivially copyable: copy it into kernel Args.
  transport::GinTransport const& transport() const;
  size_t buffer_bytes() const;
  int gin_type() const;  // ncclGinType_t from ncclCommQueryProperties

  int num_signals() const;

  // Collective: no kernel may still use the transport (synchronize its streams first).
  void close();
  // After ncclCommAbort: forgets the window, buffer and device communicator without NCCL calls (an
  // aborted communicator takes none); they are released with the process. Local, never throws.
  void abandon() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace epcomm::runtime
