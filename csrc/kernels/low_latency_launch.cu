// CUDA-target launchers of the low-latency kernels over ShmTransport (peer memory): the only place they
// are launched with <<<>>>. The CPU twins are in low_latency_launch_simt.cpp. A GIN transport
// instantiates the same templates.
#include "../common/compat.cuh"
#include "low_latency.hpp"
#include "low_latency_combine.cuh"
#include "low_latency_dispatch.cuh"
#include "low_latency_reset.cuh"
#include "low_latency_validate.hpp"

namespace epcomm::kernels {

using transport::ShmTransport;
static_assert(kFitsKernelParams<LowLatencyDispatchSendArgs<ShmTransport>> &&
                  kFitsKernelParams<LowLatencyDispatchRecvArgs<ShmTransport>> &&
                  kFitsKernelParams<LowLatencyCombineSendArgs<ShmTransport>> &&
                  kFitsKernelParams<LowLatencyCombineRecvArgs<ShmTransport>> &&
                  kFitsKernelParams<LowLatencyResetSignalsArgs<ShmTransport>>,
              "low-latency kernel Args (ShmTransport) exceed the 4 KiB of kernel parameters");

int cuda_launch_low_latency_dispatch_send(LowLatencyDispatchSendArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_dispatch_send_kernel<ShmTransport>
      <<<low_latency_dispatch_send_blocks(args.num_tokens, args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_low_latency_dispatch_recv(LowLatencyDispatchRecvArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_dispatch_recv_kernel<ShmTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_low_latency_combine_send(LowLatencyCombineSendArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_combine_send_kernel<ShmTransport>
      <<<low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_low_latency_combine_recv(LowLatencyCombineRecvArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_combine_recv_kernel<ShmTransport>
      <<<low_latency_combine_recv_blocks(args.num_tokens, args.comm.layout.hidden), kLowLatencyThreads, 0,
         static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

int cuda_launch_low_latency_reset_signals(LowLatencyResetSignalsArgs<ShmTransport> const& args, void* stream) {
  if (validate(args) != nullptr) return int(cudaErrorInvalidValue);
  low_latency_reset_signals_kernel<ShmTransport>
      <<<kLowLatencyResetBlocks, kLowLatencyThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return int(cudaGetLastError());
}

}  // namespace epcomm::kernels
