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
#include "device_runtime.hpp"

namespace epcomm::runtime::entries {

void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              kernels::LowLatencyDispatchSendParams const& params);
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              kernels::LowLatencyDispatchRecvParams const& params);
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              kernels::LowLatencyCombineSendParams const& params);
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              kernels::LowLatencyCombineRecvParams const& params);
void run_low_latency_over_gin(KernelCall const& call, kernels::LowLatencySpec const& spec,
                              kernels::LowLatencyResetSignalsParams const& params);

}  // namespace epcomm::runtime::entries
