// Compile check (make gin-check): the real internode kernels instantiated with the NCCL GIN transport
// as a GPU build across nodes will launch them. nvcc sm_90 with NCCL's device headers; -Xptxas -v is
// parsed by tools/check_ptxas.py. Never run here (no GPU, no NIC).

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include "../kernels/co_residency.hpp"
#include "../kernels/internode.hpp"
#include "../kernels/internode_combine.cuh"
#include "../kernels/internode_dispatch.cuh"
#include "../kernels/internode_notify.cuh"

namespace epcomm::kernels {

using transport::GinTransport;
static_assert(kFitsKernelParams<InternodeNotifyArgs<GinTransport>> &&
                  kFitsKernelParams<InternodeDispatchArgs<GinTransport>> &&
                  kFitsKernelParams<InternodeCombineArgs<GinTransport>>,
              "internode kernel Args (GinTransport) exceed the 4 KiB of kernel parameters");

int gin_launch_internode_notify(InternodeNotifyArgs<GinTransport> const& args, cudaStream_t stream) {
  internode_notify_kernel<GinTransport><<<kInternodeNotifyBlocks, kInternodeNotifyThreads, 0, stream>>>(args);
  return int(cudaGetLastError());
}

// As the ShmTransport launcher (internode_launch.cu): 3 x C blocks that must fit the device at once.
int gin_launch_internode_dispatch(InternodeDispatchArgs<GinTransport> const& args, cudaStream_t stream,
                                  CoResidency* refused = nullptr) {
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_dispatch_kernel<GinTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_dispatch_kernel<GinTransport><<<grid.blocks(), grid.threads_per_block, 0, stream>>>(args);
  return int(cudaGetLastError());
}

// As the ShmTransport launcher (internode_launch.cu): 3 x C blocks that must fit the device at once.
int gin_launch_internode_combine(InternodeCombineArgs<GinTransport> const& args, cudaStream_t stream,
                                 CoResidency* refused = nullptr) {
  CoResidency const grid{args.kName, args.comm.config.nvl.num_channels, kInternodeBlocksPerChannel,
                         internode_block_threads(args.comm.num_nodes(), args.comm.num_nvl_ranks)};
  if (int const error = check_co_residency(internode_combine_kernel<GinTransport>, grid, refused);
      error != int(cudaSuccess))
    return error;
  internode_combine_kernel<GinTransport><<<grid.blocks(), grid.threads_per_block, 0, stream>>>(args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
