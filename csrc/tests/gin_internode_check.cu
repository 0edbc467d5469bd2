// Compile check (make gin-check): the real internode kernels instantiated with the NCCL GIN transport
// as a GPU build across nodes will launch them. nvcc sm_90 with NCCL's device headers; -Xptxas -v is
// parsed by tools/check_ptxas.py. Never run here (no GPU, no NIC).

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

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

int gin_launch_internode_dispatch(InternodeDispatchArgs<GinTransport> const& args, cudaStream_t stream) {
  int const threads = internode_block_threads(args.comm.num_ranks / args.comm.num_nvl_ranks, args.comm.num_nvl_ranks);
  internode_dispatch_kernel<GinTransport><<<internode_num_blocks(args.comm.config), threads, 0, stream>>>(args);
  return int(cudaGetLastError());
}

int gin_launch_internode_combine(InternodeCombineArgs<GinTransport> const& args, cudaStream_t stream) {
  int const threads = internode_block_threads(args.comm.num_ranks / args.comm.num_nvl_ranks, args.comm.num_nvl_ranks);
  internode_combine_kernel<GinTransport><<<internode_num_blocks(args.comm.config), threads, 0, stream>>>(args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
