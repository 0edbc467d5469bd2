// Compile check (make gin-check): the low-latency kernels instantiated with the NCCL GIN transport, as a
// GPU build across nodes would launch them (16-warp blocks fit GinTransport::kMaxBlockWarps). nvcc sm_90
// with NCCL's device headers; -Xptxas -v is parsed by tools/check_ptxas.py. Never run here (no GPU, no NIC).

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include "../kernels/low_latency.hpp"
#include "../kernels/low_latency_combine.cuh"
#include "../kernels/low_latency_dispatch.cuh"

namespace epcomm::kernels {

using transport::GinTransport;
static_assert(kFitsKernelParams<LowLatencyDispatchSendArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyDispatchRecvArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyCombineSendArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyCombineRecvArgs<GinTransport>>,
              "low-latency kernel Args (GinTransport) exceed the 4 KiB of kernel parameters");
static_assert(kLowLatencyWarps <= GinTransport::kMaxBlockWarps, "LL blocks exceed GinTransport's warps per block");

int gin_launch_low_latency_dispatch_send(LowLatencyDispatchSendArgs<GinTransport> const& args, cudaStream_t stream) {
  low_latency_dispatch_send_kernel<GinTransport>
      <<<low_latency_dispatch_send_blocks(args.num_tokens, args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         stream>>>(args);
  return int(cudaGetLastError());
}

int gin_launch_low_latency_dispatch_recv(LowLatencyDispatchRecvArgs<GinTransport> const& args, cudaStream_t stream) {
  low_latency_dispatch_recv_kernel<GinTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0, stream>>>(args);
  return int(cudaGetLastError());
}

int gin_launch_low_latency_combine_send(LowLatencyCombineSendArgs<GinTransport> const& args, cudaStream_t stream) {
  low_latency_combine_send_kernel<GinTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0, stream>>>(args);
  return int(cudaGetLastError());
}

int gin_launch_low_latency_combine_recv(LowLatencyCombineRecvArgs<GinTransport> const& args, cudaStream_t stream) {
  low_latency_combine_recv_kernel<GinTransport>
      <<<low_latency_combine_recv_blocks(args.num_tokens, args.comm.layout.hidden), kLowLatencyThreads, 0, stream>>>(
          args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
