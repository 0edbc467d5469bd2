// CUDA-target launchers of the internode kernels over ShmTransport (peer
// memory): the only place they are launched with <<<>>>. The CPU twins are in
// internode_launch_simt.cpp. A GIN transport instantiates the same templates.
#include "../common/compat.cuh"
#include "co_residency_check.hpp"
#include "internode.hpp"
#include "internode_combine.cuh"
#include "internode_dispatch.cuh"
#include "internode_notify.cuh"
#include "internode_validate.hpp"

namespace epcomm::kernels {

using transport::ShmTransport;
static_assert(kFitsKernelParams<InternodeNotifyArgs<ShmTransport>> &&
                  kFitsKernelParams<InternodeDispatchArgs<ShmTransport>> &&
                  kFitsKernelParams<InternodeCombineArgs<ShmTransport>>,
              "internode kernel Args (ShmTransport) exceed the 4 KiB of kernel parameters");

int cuda_launch_internode_notify(InternodeNotifyArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  internode_notify_kernel<ShmTransport><<<kInternodeNotifyBlocks, kInternodeNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_internode_dispatch(InternodeDispatchArgs<ShmTransport> const& args, void* stream,
                                   CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_dispatch_kernel<ShmTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_dispatch_kernel<ShmTransport>
      <<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_internode_combine(InternodeCombineArgs<ShmTransport> const& args, void* stream,
                                  CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_combine_kernel<ShmTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_combine_kernel<ShmTransport>
      <<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_internode_blocks_per_sm(int threads_per_block, int* blocks_per_sm) {
  int dispatch = 0, combine = 0;
  cudaError_t error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &dispatch, internode_dispatch_kernel<ShmTransport>, threads_per_block, 0);
  if (error == cudaSuccess)
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&combine, internode_combine_kernel<ShmTransport>,
                                                          threads_per_block, 0);
  *blocks_per_sm = dispatch < combine ? dispatch : combine;
  return int(error);
}

}  // namespace epcomm::kernels
