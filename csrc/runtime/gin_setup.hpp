#pragma once
// Host side of the GIN transport (transport/gin_transport.cuh): what one rank does to turn an
// NCCL communicator into a GinTransport, and back. Implemented in gin_setup.cu (nvcc, no torch).
//
//   GinSession session(comm, buffer_bytes, num_signals);  // collective over comm
//   kernel_args.transport = session.transport();          // by value into the kernel's Args
//   ... launch, synchronize ...
//   session.close();                                      // collective; the destructor does it too
//
// Where the communicator comes from: torch's ProcessGroupNCCL owns one per device, and
// c10d::ProcessGroupNCCL::getCommPtr() returns it as an int64_t (torch 2.14 also binds it to
// Python as `_comm_ptr()` on the group's NCCL backend, `group._get_backend(torch.device("cuda"))`).
// It exists only once NCCL has been initialised on that group (init_process_group(device_id=...)
// or a first collective). The session borrows it: the process group must outlive the session.
// (The torch glue is not here.)
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

namespace epcomm::transport {
struct GinTransport;
}

namespace epcomm::runtime {

class GinSession {
 public:
  // Collective over `comm`. Allocates and registers a symmetric RDMA buffer of `buffer_bytes`
  // (rounded up to NCCL_WIN_REQUIRED_ALIGNMENT, zeroed) and a device communicator with
  // `num_signals` GIN signals and one GIN context.
  GinSession(ncclComm_t comm, size_t buffer_bytes, int num_signals);
  ~GinSession();  // close() if still open, without throwing
  GinSession(GinSession const&) = delete;
  GinSession& operator=(GinSession const&) = delete;

  // Valid until close(). Trivially copyable: copy it into kernel Args.
  transport::GinTransport const& transport() const;
  size_t buffer_bytes() const;
  int gin_type() const;  // ncclGinType_t from ncclCommQueryProperties

  // Collective: no kernel may still use the transport (synchronize its streams first).
  void close();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace epcomm::runtime
