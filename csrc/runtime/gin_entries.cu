// The internode (two-hop) kernels as cuda-runtime entries over NCCL GIN: the NVL region of each rank's
// IPC buffer reaches this node's ranks (CUDA IPC, cuda_runtime.cu maps only them), the network reaches
// every rank through the runtime's GinNetwork (gin_network.hpp). Built with NCCL's headers only
// (setup.py); without them the cuda extension has the intranode entries alone.
//
// Where the RDMA workspace lives: in the GIN window (GinTransport offsets are window offsets), not in the
// IPC buffer after the NVL region as with ShmTransport. spec.rdma_offset still bounds the NVL region
// (the NVL workspace must end before it, and it must lie inside the IPC buffer), so the spec and its
// checks are the same on both targets; the Python side (CudaDispatchBackend) sizes the IPC buffer to
// rdma_offset and the window to the RDMA workspace.

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include <string>

#include "../kernels/internode_gin.hpp"
#include "cuda_target.hpp"
#include "gin_network.hpp"
#include "internode_entries.hpp"

namespace epcomm::runtime::entries {

// GinTransport from the runtime's network; the kernels' signals are GIN signals [0, num_signals) of its
// session (RdmaWorkspace::num_signals(): the session must have at least as many; the backend makes a new
// runtime, and so a new session, when a layout needs more).
template <>
struct TransportBinding<transport::GinTransport> : GinBinding {
  static GinNetwork& network_of(KernelCall const& call) { return usable_network(call.runtime, "internode kernels"); }

  transport::GinTransport make(KernelCall const& call, kernels::InternodeSpec const& /*spec*/,
                               kernels::RdmaWorkspace const& workspace, uint64_t* byte_counters) {
    // GIN counts no bytes: the counters stay as the caller zeroed them, so buffer.traffic has no
    // transport-counted bytes on the cuda backend across nodes (not wired yet).
    (void)byte_counters;
    return attach(call, workspace.num_signals(), "internode kernels").transport();
  }

  // The whole window holds the RDMA workspace.
  static size_t rdma_capacity(KernelCall const& call, kernels::InternodeSpec const& /*spec*/) {
    return network_of(call).rdma_bytes();
  }
};

}  // namespace epcomm::runtime::entries

namespace epcomm::runtime {

namespace {

struct RegisterInternodeOverGin {
  RegisterInternodeOverGin() { entries::register_internode_entries<CudaTarget, transport::GinTransport>(); }
} const register_internode_over_gin;

}  // namespace

}  // namespace epcomm::runtime
