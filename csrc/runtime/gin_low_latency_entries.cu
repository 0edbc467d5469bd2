// The low-latency kernels as cuda-runtime entries over NCCL GIN: every peer, this node's included, through
// the runtime's GinNetwork (gin_network.hpp). Built with NCCL's headers only (setup.py).
//
// Where the LL region lives: in the GIN window, at spec.region_offset (0 from Python), not in the IPC
// buffer. The LL layout names places by absolute offset, the same on every rank, and GinTransport's offsets
// are offsets into the symmetric window, so the window is where those places exist on every peer. It is the
// window the internode kernels' RDMA workspace uses too: LL and normal mode share it, as they share the
// buffer in DeepEP and in the sim backend (hence "clean before LL"; the Python side sizes the window for
// the larger of the two).
//
// Same-node peers: through GIN as well, not NVLink (allow_nvlink_for_low_latency_mode has no effect on the
// cuda backend). GPU-only assumption: NCCL's device API lets a GIN put or signal target a peer of the same
// node and the rank itself (its guide allows a loopback peer); never run here.
//
// Signals: the layout's 4E + 1 signals are their own range of the session, at its top:
// [num_signals - (4E + 1), num_signals), while the internode kernels use [0, RdmaWorkspace::num_signals()).
// The two never overlap as long as the session has at least the sum, which the Python side asks for when
// it makes the session (CudaDispatchBackend); here only "the LL range fits" can be checked.

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include <string>

#include "../kernels/low_latency_gin.hpp"
#include "cuda_low_latency.hpp"
#include "cuda_target.hpp"
#include "gin_network.hpp"
#include "low_latency_entries.hpp"

namespace epcomm::runtime::entries {

template <>
struct LowLatencyTransportBinding<transport::GinTransport> : GinBinding {
  transport::GinTransport make(KernelCall const& call, kernels::LowLatencySpec const& /*spec*/,
                               kernels::LowLatencyLayout const& layout, uint64_t* byte_counters) {
    // GIN counts no bytes: the counters stay as the caller zeroed them (buffer.traffic has no
    // transport-counted LL bytes on the cuda backend).
    (void)byte_counters;
    int const num_signals = layout.num_signals();
    transport::GinTransport transport = attach(call, num_signals, "low-latency kernels").transport();
    transport.signal_base += ncclGinSignal_t(network->num_signals() - num_signals);  // the top of the session
    transport.num_signals = num_signals;
    return transport;
  }

  // The whole window can hold the LL region.
  static size_t region_capacity(KernelCall const& call) {
    return usable_network(call.runtime, "low-latency kernels").rdma_bytes();
  }
};

}  // namespace epcomm::runtime::entries

namespace epcomm::runtime::entries {

// The GIN half of the cuda runtime's LL entries (cuda_low_latency_entries.cu registers them and picks).
template <template <class> class Args>
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              typename Args<transport::ShmTransport>::Params const& params) {
  run_low_latency<CudaTarget, Args<transport::GinTransport>, transport::GinTransport>(call, spec, params);
}

#define EPCOMM_INSTANTIATE(Args)                                                                          \
  template void run_low_latency_over_gin<kernels::Args>(KernelCall const&, kernels::LowLatencySpec const&, \
                                                        kernels::Args<transport::ShmTransport>::Params const&);
EPCOMM_FOR_EACH_LOW_LATENCY_KERNEL(EPCOMM_INSTANTIATE)
#undef EPCOMM_INSTANTIATE

}  // namespace epcomm::runtime::entries
