#pragma once
// The intranode kernels (kernels/intranode.hpp) as entries of a device runtime, generic over the
// Target (kernel_entries.hpp): the cpu runtime's (cpu_entries.cpp) and the cuda runtime's
// (cuda_entries.cu). An entry adds to the Params Python set the runtime's view of the peers: every
// rank's NVL buffer (the runtime's data regions), this rank's error slot and the timeout.

#include <memory>
#include <string>
#include <utility>

#include "../kernels/intranode.hpp"
#include "../kernels/intranode_validate.hpp"
#include "device_runtime.hpp"
#include "kernel_entries.hpp"

namespace epcomm::runtime::entries {

// "" when the intranode kernels take `spec`, else the rule it breaks.
inline std::string spec_problem(kernels::IntranodeSpec const& spec) {
  char const* problem = kernels::validate_config(spec.config, spec.workspace.num_ranks);
  return problem != nullptr ? problem : "";
}

// Where `spec`'s regions lie in each rank's NVL buffer.
inline kernels::NvlWorkspace nvl_workspace(kernels::IntranodeSpec const& spec) {
  return kernels::NvlWorkspace(spec.workspace, spec.config);
}

// Bytes per rank a call of `spec` needs: (NVL region, RDMA region = 0). Refuses a spec the kernels cannot take.
inline std::pair<size_t, size_t> workspace_bytes(kernels::IntranodeSpec const& spec) {
  if (std::string const problem = spec_problem(spec); !problem.empty())
    throw RuntimeError(ErrorCode::kInvalidArgument, "intranode kernels: " + problem);
  return {nvl_workspace(spec).required_bytes(), 0};
}

inline kernels::CommArgs intranode_comm(KernelCall const& call, kernels::IntranodeSpec const& spec,
                                        kernels::ErrorSlot* slot, char const* name) {
  DeviceRuntime const& runtime = call.runtime;
  if (spec.workspace.num_ranks != runtime.num_ranks())
    throw invalid_argument(name, "spec.workspace.num_ranks=" + std::to_string(spec.workspace.num_ranks) +
                                     " but the runtime has " + std::to_string(runtime.num_ranks()) + " ranks");
  if (std::string const problem = spec_problem(spec); !problem.empty()) throw invalid_argument(name, problem);
  kernels::CommArgs comm;
  comm.rank = runtime.rank();
  comm.num_ranks = runtime.num_ranks();
  comm.config = spec.config;
  comm.workspace = nvl_workspace(spec);
  if (comm.workspace.required_bytes() > runtime.num_bytes())
    throw invalid_argument(name, "the kernels need a " + std::to_string(comm.workspace.required_bytes()) +
                                     "-byte NVL buffer, this one has " + std::to_string(runtime.num_bytes()) + " bytes");
  comm.peer_buffers = runtime.device_peer_data_table();
  comm.error = slot;
  comm.timeout_cycles = timeout_cycles(call);
  return comm;
}

template <DeviceTarget Target, class Args>
void run_intranode(KernelCall const& call, kernels::IntranodeSpec const& spec, typename Args::Params const& params) {
  auto slot = std::make_unique<typename Target::Slot>(call);  // a stable address: an enqueued kernel writes it later
  Args args;
  static_cast<typename Args::Params&>(args) = params;
  args.comm = intranode_comm(call, spec, slot->kernel_view(), Args::kName);
  launch_kernel<Target>(call, args, std::move(slot));
}

template <DeviceTarget Target>
void register_intranode_entries() {
  register_kernel<kernels::NotifyParams>(Target::kKind, run_intranode<Target, kernels::NotifyArgs>);
  register_kernel<kernels::IntranodeDispatchParams>(Target::kKind, run_intranode<Target, kernels::IntranodeDispatchArgs>);
  register_kernel<kernels::IntranodeCombineParams>(Target::kKind, run_intranode<Target, kernels::IntranodeCombineArgs>);
}

}  // namespace epcomm::runtime::entries
