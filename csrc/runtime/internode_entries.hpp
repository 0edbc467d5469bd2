#pragma once
// The internode (two-hop) kernels (kernels/internode.hpp) as entries of a device runtime, generic
// over the Target (kernel_entries.hpp) and the Transport (transport/transport.cuh): an entry for a
// new pair is an instantiation plus, for a new transport, one TransportBinding specialization.
// Each rank's data region holds the NVL workspace at 0; where the RDMA workspace lives is the
// binding's business: ShmTransport's is in the data region at spec.rdma_offset (after the NVL one),
// GinTransport's is the NCCL window of the runtime's network (gin_entries.cu), where spec.rdma_offset
// only bounds the NVL region.
//
// Instantiated: cpu + ShmTransport (cpu_entries.cpp: every rank's buffer mapped by every rank through
// POSIX shared memory, ShmTransport's puts standing in for the network) and cuda + GinTransport
// (gin_entries.cu: the NVL peers of this node over CUDA IPC, the network over NCCL GIN).

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../kernels/internode.hpp"
#include "../kernels/internode_validate.hpp"
#include "../transport/shm_transport.cuh"
#include "device_runtime.hpp"
#include "intranode_entries.hpp"
#include "kernel_entries.hpp"

namespace epcomm::runtime::entries {

// How a Transport is built for one call: specialize with a `make` that returns the transport,
// keeping in the binding object whatever it points to for the duration of the launch.
template <class Transport>
struct TransportBinding;

// ShmTransport over the runtime's peer table: every rank's RDMA region is mapped in this process.
template <>
struct TransportBinding<transport::ShmTransport> {
  std::vector<char*> rdma_buffers;  // [R] each rank's RDMA region, as mapped here

  transport::ShmTransport make(KernelCall const& call, kernels::InternodeSpec const& spec,
                               kernels::RdmaWorkspace const& workspace, uint64_t* byte_counters) {
    DeviceRuntime const& runtime = call.runtime;
    void* const* peers = runtime.device_peer_data_table();
    for (int r = 0; r < runtime.num_ranks(); ++r) rdma_buffers.push_back(static_cast<char*>(peers[r]) + spec.rdma_offset);
    return {runtime.rank(), runtime.num_ranks(), spec.workspace.num_nvl_ranks, rdma_buffers.data(),
            workspace.signals_offset, byte_counters};
  }
  // The RDMA region is the rest of the data region after spec.rdma_offset.
  static size_t rdma_capacity(KernelCall const& call, kernels::InternodeSpec const& spec) {
    size_t const offset = size_t(spec.rdma_offset < 0 ? 0 : spec.rdma_offset);
    return call.runtime.num_bytes() > offset ? call.runtime.num_bytes() - offset : 0;
  }
  void host_gave_up() {}  // CPU grids run to completion
};

// "" when the internode kernels take `spec`, else the rule it breaks.
inline std::string spec_problem(kernels::InternodeSpec const& spec) {
  char const* problem = kernels::validate_rdma_shape(spec.workspace, spec.config);
  return problem != nullptr ? problem : "";
}

// Where `spec`'s NVL regions lie in each rank's buffer (the NVL region starts it).
inline kernels::NvlWorkspace nvl_workspace(kernels::InternodeSpec const& spec) {
  return kernels::NvlWorkspace(kernels::internode_nvl_shape(spec), spec.config.nvl);
}

// Bytes per rank a call of `spec` needs: (NVL region, RDMA region). Refuses a spec the kernels cannot take.
inline std::pair<size_t, size_t> workspace_bytes(kernels::InternodeSpec const& spec) {
  if (std::string const problem = spec_problem(spec); !problem.empty())
    throw RuntimeError(ErrorCode::kInvalidArgument, "internode kernels: " + problem);
  return {nvl_workspace(spec).required_bytes(), kernels::RdmaWorkspace(spec.workspace, spec.config).required_bytes()};
}

template <class Transport>
kernels::InternodeComm<Transport> internode_comm(KernelCall const& call, kernels::InternodeSpec const& spec,
                                                 kernels::ErrorSlot* slot, TransportBinding<Transport>& binding,
                                                 uint64_t* byte_counters, char const* name) {
  DeviceRuntime const& runtime = call.runtime;
  kernels::RdmaWorkspaceShape const& shape = spec.workspace;
  if (shape.num_nodes * shape.num_nvl_ranks != runtime.num_ranks())
    throw invalid_argument(name, "spec.workspace has " + std::to_string(shape.num_nodes) + " nodes x " +
                                     std::to_string(shape.num_nvl_ranks) + " ranks but the runtime has " +
                                     std::to_string(runtime.num_ranks()) + " ranks");
  if (std::string const problem = spec_problem(spec); !problem.empty()) throw invalid_argument(name, problem);
  kernels::InternodeComm<Transport> comm;
  comm.rank = runtime.rank();
  comm.num_ranks = runtime.num_ranks();
  comm.num_nvl_ranks = shape.num_nvl_ranks;
  comm.config = spec.config;
  comm.nvl_workspace = nvl_workspace(spec);
  comm.rdma_workspace = kernels::RdmaWorkspace(shape, spec.config);
  size_t const nvl_bytes = comm.nvl_workspace.required_bytes(), rdma_bytes = comm.rdma_workspace.required_bytes();
  size_t const rdma_capacity = TransportBinding<Transport>::rdma_capacity(call, spec);
  if (spec.rdma_offset < 0 || nvl_bytes > size_t(spec.rdma_offset) || size_t(spec.rdma_offset) > runtime.num_bytes() ||
      rdma_bytes > rdma_capacity)
    throw invalid_argument(name, "the kernels need " + std::to_string(nvl_bytes) + " NVL bytes before rdma_offset=" +
                                     std::to_string(spec.rdma_offset) + " and " + std::to_string(rdma_bytes) +
                                     " RDMA bytes; the buffer has " + std::to_string(runtime.num_bytes()) +
                                     " bytes, the RDMA region " + std::to_string(rdma_capacity));
  // [R] by world rank; this node's ranks are contiguous, and only they need be mapped (the cuda runtime
  // across nodes opens this node's peers only: the others' entries are null and never read here)
  void* const* peers = runtime.device_peer_data_table();
  comm.nvl_peer_buffers = peers + comm.node() * shape.num_nvl_ranks;
  comm.transport = binding.make(call, spec, comm.rdma_workspace, byte_counters);
  comm.error = slot;
  comm.timeout_cycles = timeout_cycles(call);
  return comm;
}

template <class Params>
uint64_t* byte_counters_of(Params const& params) {
  if constexpr (requires { params.byte_counters; }) return params.byte_counters;
  return nullptr;
}

template <DeviceTarget Target, class Args, class Transport>
void run_internode(KernelCall const& call, kernels::InternodeSpec const& spec, typename Args::Params const& params) {
  auto slot = std::make_unique<typename Target::Slot>(call);  // a stable address: an enqueued kernel writes it later
  TransportBinding<Transport> binding;
  Args args;
  static_cast<typename Args::Params&>(args) = params;
  args.comm = internode_comm(call, spec, slot->kernel_view(), binding, byte_counters_of(params), Args::kName);
  if constexpr (requires { args.max_nodes_per_token; }) args.max_nodes_per_token = spec.workspace.max_nodes_per_token;
  // the give-up action holds a copy of the binding: an enqueued kernel outlives this frame
  launch_kernel<Target>(call, args, std::move(slot), [binding]() mutable { binding.host_gave_up(); });
}

template <DeviceTarget Target, class Transport>
void register_internode_entries() {
  using namespace kernels;
  register_kernel<InternodeNotifyParams>(Target::kKind, run_internode<Target, InternodeNotifyArgs<Transport>, Transport>);
  register_kernel<InternodeDispatchParams>(Target::kKind,
                                           run_internode<Target, InternodeDispatchArgs<Transport>, Transport>);
  register_kernel<InternodeCombineParams>(Target::kKind, run_internode<Target, InternodeCombineArgs<Transport>, Transport>);
}

}  // namespace epcomm::runtime::entries
