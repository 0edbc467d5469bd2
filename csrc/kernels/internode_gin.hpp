#pragma once
// The launchers of the internode kernels over the NCCL GIN transport (internode_launch_gin.cu), for
// the cuda runtime's entries (runtime/gin_entries.cu, which find them by argument-dependent lookup
// through CudaTarget). Each enqueues on `stream` and returns a cudaError_t; dispatch and combine first
// check that their 3 x C blocks fit the device at once (co_residency.hpp; kCoResidencyRefused and
// *refused filled when they do not). Needs GinTransport's definition only where Args are built.

#include "co_residency_check.hpp"
#include "internode.hpp"

namespace epcomm::transport {
struct GinTransport;
}

namespace epcomm::kernels {

int cuda_launch_grid(InternodeNotifyArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(InternodeDispatchArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);
int cuda_launch_grid(InternodeCombineArgs<transport::GinTransport> const& args, void* stream, CoResidency* refused);

}  // namespace epcomm::kernels
