// The low-latency kernels as cuda-runtime entries (cuda_low_latency.hpp): peer memory over CUDA IPC on one
// node, NCCL GIN across nodes, chosen per call by whether the runtime has a network. No torch headers here.
//
// GPU-only assumptions (never run here): every rank of the node maps every other's buffer (CUDA IPC with
// peer access, as the intranode kernels need), so ShmTransport's plain stores and system-scope atomic adds
// reach the peer's memory over NVLink; a release add after the stores makes them visible to a peer that
// acquires the signal (PTX memory model, system scope, peer memory included).

#include "cuda_low_latency.hpp"
#include "cuda_target.hpp"
#include "low_latency_entries.hpp"

namespace epcomm::kernels {

// no co-residency needed: an LL grid's blocks wait on peers' signals, never on each other
inline int cuda_launch_grid(LowLatencyDispatchSendArgs<transport::ShmTransport> const& args, void* stream, CoResidency*) {
  return cuda_launch_low_latency_dispatch_send(args, stream);
}
inline int cuda_launch_grid(LowLatencyDispatchRecvArgs<transport::ShmTransport> const& args, void* stream, CoResidency*) {
  return cuda_launch_low_latency_dispatch_recv(args, stream);
}
inline int cuda_launch_grid(LowLatencyCombineSendArgs<transport::ShmTransport> const& args, void* stream, CoResidency*) {
  return cuda_launch_low_latency_combine_send(args, stream);
}
inline int cuda_launch_grid(LowLatencyCombineRecvArgs<transport::ShmTransport> const& args, void* stream, CoResidency*) {
  return cuda_launch_low_latency_combine_recv(args, stream);
}
inline int cuda_launch_grid(LowLatencyResetSignalsArgs<transport::ShmTransport> const& args, void* stream,
                            CoResidency*) {
  return cuda_launch_low_latency_reset_signals(args, stream);
}

}  // namespace epcomm::kernels

namespace epcomm::runtime {

namespace {

template <template <class> class Args>
void register_low_latency_entry() {
  using Params = typename Args<transport::ShmTransport>::Params;
  register_kernel<Params>(CudaTarget::kKind, [](KernelCall const& call, kernels::LowLatencySpec const& spec,
                                                Params const& params) {
    if (call.runtime.network() != nullptr) return entries::run_low_latency_over_gin<Args>(call, spec, params);
    entries::run_low_latency<CudaTarget, Args<transport::ShmTransport>, transport::ShmTransport>(call, spec, params);
  });
}

struct RegisterLowLatency {
  RegisterLowLatency() {
#define EPCOMM_REGISTER(Args) register_low_latency_entry<kernels::Args>();
    EPCOMM_FOR_EACH_LOW_LATENCY_KERNEL(EPCOMM_REGISTER)
#undef EPCOMM_REGISTER
  }
} const register_low_latency;

}  // namespace

}  // namespace epcomm::runtime
