#pragma once
// The launchers of the low-latency kernels over the NCCL GIN transport (low_latency_launch_gin.cu), for the
// cuda runtime's LL entries (runtime/gin_low_latency_entries.cu, which find them by argument-dependent
// lookup through CudaTarget). Each enqueues on `stream` and returns a cudaError_t (cudaErrorInvalidValue
// for arguments validate refuses). Needs GinTransport's definition only where Args are built.

#include "co_residency_check.hpp"
#include "low_latency.hpp"

namespace epcomm::transport {
struct GinTransport;
}

namespace epcomm::kernels {

int cuda_launch_grid(LowLatencyDispatchSendArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(LowLatencyDispatchRecvArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(LowLatencyCombineSendArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(LowLatencyCombineRecvArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(LowLatencyResetSignalsArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);

}  // namespace epcomm::kernels
