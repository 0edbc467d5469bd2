#pragma once
// The low-latency entries of the cuda runtime pick their transport per call (cuda_low_latency_entries.cu):
//   one node (no network): peer memory over CUDA IPC, ShmTransport on the runtime's peer table (plain
//     stores into a peer's mapped buffer, signals as system-scope atomics there), the LL region in each
//     rank's IPC data region, as on the cpu runtime;
//   across nodes (open_network was called): NCCL GIN for every peer (gin_low_latency_entries.cu), the LL
//     region in the GIN window.
// The GIN side is declared here and defined in gin_low_latency_entries.cu, or, in a build without NCCL's
// headers, in gin_network_absent.cpp (which throws kNoDevice): one registration per Params either way, so
// no static-initialization order decides which entry wins.

#include "../kernels/low_latency.hpp"
#include "../transport/shm_transport.cuh"
#include "device_runtime.hpp"

// The LL kernels by their Args template, one list for the registration and both definitions of the GIN half:
// X(Args) for each.
#define EPCOMM_FOR_EACH_LOW_LATENCY_KERNEL(X)                                                                   \
  X(LowLatencyDispatchSendArgs) X(LowLatencyDispatchRecvArgs) X(LowLatencyCombineSendArgs)                      \
  X(LowLatencyCombineRecvArgs) X(LowLatencyResetSignalsArgs)

namespace epcomm::runtime::entries {

// The GIN half of kernel Args (Params are the same struct for every transport: named here through
// ShmTransport, as GinTransport needs NCCL's headers). Explicitly instantiated for every LL kernel.
template <template <class> class Args>
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              typename Args<transport::ShmTransport>::Params const& params);

}  // namespace epcomm::runtime::entries
