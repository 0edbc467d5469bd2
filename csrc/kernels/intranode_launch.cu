// CUDA-target launchers of the intranode kernels: the only place they are
// launched with <<<>>>. The CPU twins are in intranode_launch_simt.cpp.
#include "../common/compat.cuh"
#include "co_residency_check.hpp"
#include "intranode.hpp"
#include "intranode_combine.cuh"
#include "intranode_dispatch.cuh"
#include "intranode_validate.hpp"
#include "layout.cuh"
#include "notify.cuh"

namespace epcomm::kernels {

int cuda_launch_get_dispatch_layout(LayoutArgs const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  get_dispatch_layout_kernel<<<layout_num_blocks(args.num_experts, args.num_ranks), kLayoutThreads, 0,
                               static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_notify(NotifyArgs const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  notify_kernel<<<1, kNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_intranode_dispatch(IntranodeDispatchArgs const& args, void* stream, CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.num_channels, kIntranodeBlocksPerChannel,
                         comm_block_threads(args.comm.num_ranks)};
  if (int const error = check_co_residency(intranode_dispatch_kernel, grid, refused);
      error != int(cudaSuccess))
    return error;
  intranode_dispatch_kernel<<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_intranode_combine(IntranodeCombineArgs const& args, void* stream, CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.num_channels, kIntranodeBlocksPerChannel,
                         comm_block_threads(args.comm.num_ranks)};
  if (int const error = check_co_residency(intranode_combine_kernel, grid, refused);
      error != int(cudaSuccess))
    return error;
  intranode_combine_kernel<<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_intranode_blocks_per_sm(int threads_per_block, int* blocks_per_sm) {
  int dispatch = 0, combine = 0;
  cudaError_t error =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&dispatch, intranode_dispatch_kernel, threads_per_block, 0);
  if (error == cudaSuccess)
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&combine, intranode_combine_kernel, threads_per_block, 0);
  *blocks_per_sm = dispatch < combine ? dispatch : combine;
  return int(error);
}

}  // namespace epcomm::kernels
