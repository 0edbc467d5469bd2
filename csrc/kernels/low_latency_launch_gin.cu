// CUDA-target launchers of the low-latency kernels over the NCCL GIN transport: what the cuda runtime's LL
// entries launch (runtime/gin_low_latency_entries.cu, which finds them by argument-dependent lookup through
// CudaTarget). Built with NCCL's headers only (setup.py); make -C csrc gin-check compiles this file with
// -Xptxas -v (16-warp blocks fit GinTransport::kMaxBlockWarps; no spills, no stack). The ShmTransport twins
// are in low_latency_launch.cu. Never run here (no GPU, no NIC).

#include "../transport/gin_transport.cuh"  // first: it configures NCCL's device headers

#include "low_latency.hpp"
#include "low_latency_combine.cuh"
#include "low_latency_dispatch.cuh"
#include "low_latency_gin.hpp"
#include "low_latency_reset.cuh"
#include "low_latency_validate.hpp"

namespace epcomm::kernels {

using transport::GinTransport;
static_assert(kFitsKernelParams<LowLatencyDispatchSendArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyDispatchRecvArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyCombineSendArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyCombineRecvArgs<GinTransport>> &&
                  kFitsKernelParams<LowLatencyResetSignalsArgs<GinTransport>>,
              "low-latency kernel Args (GinTransport) exceed the 4 KiB of kernel parameters");
static_assert(kLowLatencyWarps <= GinTransport::kMaxBlockWarps, "LL blocks exceed GinTransport's warps per block");

// The LL kernels never wait on another block of their grid (low_latency.hpp), so no co-residency check:
// `refused` is never filled.
int cuda_launch_grid(LowLatencyDispatchSendArgs<GinTransport> const& args, void* stream, CoResidency* /*refused*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_dispatch_send_kernel<GinTransport>
      <<<low_latency_dispatch_send_blocks(args.num_tokens, args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_grid(LowLatencyDispatchRecvArgs<GinTransport> const& args, void* stream, CoResidency* /*refused*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_dispatch_recv_kernel<GinTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_grid(LowLatencyCombineSendArgs<GinTransport> const& args, void* stream, CoResidency* /*refused*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_combine_send_kernel<GinTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_grid(LowLatencyCombineRecvArgs<GinTransport> const& args, void* stream, CoResidency* /*refused*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_combine_recv_kernel<GinTransport>
      <<<low_latency_combine_recv_blocks(args.num_tokens, args.comm.layout.hidden), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_grid(LowLatencyResetSignalsArgs<GinTransport> const& args, void* stream, CoResidency* /*refused*/) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_reset_signals_kernel<GinTransport>
      <<<kLowLatencyResetBlocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
