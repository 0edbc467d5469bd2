// CUDA-target launchers of the internode kernels over the NCCL GIN transport (the network between
// nodes; the NVL peers of a node over CUDA IPC): what the cuda runtime's internode entries launch
// (runtime/gin_entries.cu). Built with NCCL's headers only (setup.py; make -C csrc gin-check compiles
// this file with -Xptxas -v: 16-warp blocks, no spills, no stack). The ShmTransport twins are in
// internode_launch.cu.

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include "co_residency_check.hpp"
#include "internode.hpp"
#include "internode_combine.cuh"
#include "internode_dispatch.cuh"
#include "internode_gin.hpp"
#include "internode_notify.cuh"
#include "internode_validate.hpp"

namespace epcomm::kernels {

using transport::GinTransport;
static_assert(kFitsKernelParams<InternodeNotifyArgs<GinTransport>> &&
                  kFitsKernelParams<InternodeDispatchArgs<GinTransport>> &&
                  kFitsKernelParams<InternodeCombineArgs<GinTransport>>,
              "internode kernel Args (GinTransport) exceed the 4 KiB of kernel parameters");

int cuda_launch_grid(InternodeNotifyArgs<GinTransport> const& args, void* stream, CoResidency* /*one block*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  internode_notify_kernel<GinTransport>
      <<<kInternodeNotifyBlocks, kInternodeNotifyThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

// 3 x C blocks that must fit the device at once (co_residency.hpp), as the ShmTransport launchers.
int cuda_launch_grid(InternodeDispatchArgs<GinTransport> const& args, void* stream, CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_dispatch_kernel<GinTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_dispatch_kernel<GinTransport>
      <<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_grid(InternodeCombineArgs<GinTransport> const& args, void* stream, CoResidency* refused) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_combine_kernel<GinTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_combine_kernel<GinTransport>
      <<<grid.blocks(), grid.threads_per_block, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
