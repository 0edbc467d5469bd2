#pragma once
// The low-latency kernels (kernels/low_latency.hpp) as entries of a device runtime, generic over the
// Target (kernel_entries.hpp) and the Transport. Each rank's data region holds the LL region at
// spec.region_offset (the sim backend puts it at 0: LL and normal mode share the buffer, hence
// DeepEP's "clean before LL" rule); the transport's "RDMA buffer" of rank r is rank r's whole data
// region, so the layout's absolute offsets name the same place on every rank.
//
// Where the region lives is the binding's business (as TransportBinding's RDMA region for the internode
// kernels): ShmTransport's is each rank's data region (region_capacity: the runtime's bytes), with its
// signals inside the region; GinTransport's is the GIN window of the runtime's network, with the
// signals in the GIN session (gin_low_latency_entries.cu).
//
// Instantiated: cpu + ShmTransport (cpu_entries.cpp) and cuda + GinTransport (gin_low_latency_entries.cu,
// built with NCCL's headers: every peer through GIN, same-node peers included).

#include <string>
#include <vector>

#include "../kernels/low_latency.hpp"
#include "../kernels/low_latency_validate.hpp"
#include "../transport/shm_transport.cuh"
#include "device_runtime.hpp"
#include "kernel_entries.hpp"

namespace epcomm::runtime::entries {

template <class Transport>
struct LowLatencyTransportBinding;

// ShmTransport over the runtime's peer table (every rank's data region is mapped in this process).
template <>
struct LowLatencyTransportBinding<transport::ShmTransport> {
  transport::ShmTransport make(KernelCall const& call, kernels::LowLatencySpec const& spec,
                               kernels::LowLatencyLayout const& layout, uint64_t* byte_counters) {
    DeviceRuntime const& runtime = call.runtime;
    return {runtime.rank(), runtime.num_ranks(), spec.num_nvl_ranks,
            reinterpret_cast<char* const*>(runtime.device_peer_data_table()), layout.signals_buffer_offset(),
            byte_counters};
  }
  // The LL region lies in each rank's data region.
  static size_t region_capacity(KernelCall const& call) { return call.runtime.num_bytes(); }
  void host_gave_up() {}  // CPU grids run to completion
};

// Bytes per rank the LL region of `spec` ends at (region_offset + both slots), with `num_ranks` ranks.
inline size_t low_latency_workspace_bytes(kernels::LowLatencySpec const& spec, int num_ranks) {
  if (spec.num_max_tokens < 1 || spec.hidden < 8 || spec.hidden % 8 || spec.num_local_experts < 1 || num_ranks < 1 ||
      spec.region_offset < 0 || spec.region_offset % 128)
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       "low-latency kernels: num_max_tokens, num_local_experts >= 1, hidden a positive multiple of 8, "
                       "region_offset a multiple of 128");
  return size_t(spec.region_offset) + kernels::low_latency_layout(spec, num_ranks).required_bytes();
}

template <class Params>
uint64_t* low_latency_counters(Params const& params) {
  if constexpr (requires { params.byte_counters; }) return params.byte_counters;
  return nullptr;
}

template <DeviceTarget Target, class Args, class Transport>
void run_low_latency(KernelCall const& call, kernels::LowLatencySpec const& spec, typename Args::Params const& params) {
  DeviceRuntime const& runtime = call.runtime;
  size_t const need = low_latency_workspace_bytes(spec, runtime.num_ranks());
  size_t const capacity = LowLatencyTransportBinding<Transport>::region_capacity(call);
  if (need > capacity)
    throw invalid_argument(Args::kName, "the LL region ends at byte " + std::to_string(need) + " but the buffer has " +
                                            std::to_string(capacity) + " bytes");
  if (spec.num_nvl_ranks < 1 || runtime.num_ranks() % spec.num_nvl_ranks)
    throw invalid_argument(Args::kName, "spec.num_nvl_ranks must divide the " + std::to_string(runtime.num_ranks()) + " ranks");
  auto slot = std::make_unique<typename Target::Slot>(call);  // a stable address: an enqueued kernel writes it later
  LowLatencyTransportBinding<Transport> binding;
  Args args;
  static_cast<typename Args::Params&>(args) = params;
  args.comm.rank = runtime.rank();
  args.comm.num_ranks = runtime.num_ranks();
  args.comm.layout = kernels::low_latency_layout(spec, runtime.num_ranks());
  args.comm.transport = binding.make(call, spec, args.comm.layout, low_latency_counters(params));
  args.comm.error = slot->kernel_view();
  args.comm.timeout_cycles = timeout_cycles(call);
  // the give-up action holds a copy of the binding: an enqueued kernel outlives this frame
  launch_kernel<Target>(call, args, std::move(slot), [binding]() mutable { binding.host_gave_up(); });
}

template <DeviceTarget Target, class Transport>
void register_low_latency_entries() {
  using namespace kernels;
  register_kernel<LowLatencyDispatchSendParams>(
      Target::kKind, run_low_latency<Target, LowLatencyDispatchSendArgs<Transport>, Transport>);
  register_kernel<LowLatencyDispatchRecvParams>(
      Target::kKind, run_low_latency<Target, LowLatencyDispatchRecvArgs<Transport>, Transport>);
  register_kernel<LowLatencyCombineSendParams>(
      Target::kKind, run_low_latency<Target, LowLatencyCombineSendArgs<Transport>, Transport>);
  register_kernel<LowLatencyCombineRecvParams>(
      Target::kKind, run_low_latency<Target, LowLatencyCombineRecvArgs<Transport>, Transport>);
  register_kernel<LowLatencyResetSignalsParams>(
      Target::kKind, run_low_latency<Target, LowLatencyResetSignalsArgs<Transport>, Transport>);
}

}  // namespace epcomm::runtime::entries
