// CPU-target launchers of the low-latency kernels (epcomm::simt) over ShmTransport. The CUDA twins are
// in low_latency_launch.cu; both launch the same kernel templates with the same grid sizes.
#include "../common/compat.cuh"
#include "low_latency.hpp"
#include "low_latency_combine.cuh"
#include "low_latency_dispatch.cuh"
#include "low_latency_reset.cuh"
#include "low_latency_validate.hpp"
#include "simt_launch_util.hpp"

namespace epcomm::kernels {

using transport::ShmTransport;

void add_low_latency_dispatch_send(simt::ConcurrentLaunch& launch, LowLatencyDispatchSendArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name(LowLatencyDispatchSendParams::kName, args.comm.rank),
             low_latency_dispatch_send_blocks(args.num_tokens, args.comm.layout.num_experts()), kLowLatencyThreads, 0,
             low_latency_dispatch_send_kernel<ShmTransport>, args);
}

void add_low_latency_dispatch_recv(simt::ConcurrentLaunch& launch, LowLatencyDispatchRecvArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name(LowLatencyDispatchRecvParams::kName, args.comm.rank),
             low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
             low_latency_dispatch_recv_kernel<ShmTransport>, args);
}

void add_low_latency_combine_send(simt::ConcurrentLaunch& launch, LowLatencyCombineSendArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name(LowLatencyCombineSendParams::kName, args.comm.rank),
             low_latency_pair_blocks(args.comm.layout.num_experts()), kLowLatencyThreads, 0,
             low_latency_combine_send_kernel<ShmTransport>, args);
}

void add_low_latency_combine_recv(simt::ConcurrentLaunch& launch, LowLatencyCombineRecvArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name(LowLatencyCombineRecvParams::kName, args.comm.rank),
             low_latency_combine_recv_blocks(args.num_tokens, args.comm.layout.hidden), kLowLatencyThreads, 0,
             low_latency_combine_recv_kernel<ShmTransport>, args);
}

void add_low_latency_reset_signals(simt::ConcurrentLaunch& launch,
                                   LowLatencyResetSignalsArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name(LowLatencyResetSignalsParams::kName, args.comm.rank), kLowLatencyResetBlocks,
             kLowLatencyThreads, 0, low_latency_reset_signals_kernel<ShmTransport>, args);
}

}  // namespace epcomm::kernels
