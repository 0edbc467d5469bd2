// The intranode kernels as cpu-runtime entries (intranode_entries.hpp), for the sim backend
// (epcomm/backends/sim_backend.py): grids run through the SIMT layer on the calling thread.

#include <string>

#include "../kernels/intranode.hpp"
#include "device_runtime.hpp"
#include "intranode_entries.hpp"

namespace epcomm::runtime {

namespace {

using intranode_entries::LaunchOutcome;

struct CpuTarget {
  static constexpr char const* kKind = "cpu";

  // The kernel writes its failure straight into host memory.
  class Slot {
   public:
    kernels::ErrorSlot* kernel_view() { return &slot_; }
    kernels::ErrorSlot read() const { return slot_; }

   private:
    kernels::ErrorSlot slot_{};
  };

  template <class Args>
  static LaunchOutcome launch(Args const& args, KernelCall const& /*call: cpu streams run now, here*/) {
    simt::LaunchOptions options = kernels::default_launch_options(kernel_name(args), args.comm.timeout_cycles);
    simt::LaunchStatus const status = launch_grid(args, std::move(options));
    if (status.ok()) return {};
    ErrorCode code = ErrorCode::kKernelFailed;
    if (status.kind == simt::ErrorKind::Timeout) code = ErrorCode::kTimeout;
    if (status.kind == simt::ErrorKind::InvalidConfig) code = ErrorCode::kInvalidArgument;
    return {code, std::string(simt::error_kind_name(status.kind)) + ": " + status.message};
  }

 private:
  static char const* kernel_name(kernels::NotifyArgs const&) { return "intranode_notify"; }
  static char const* kernel_name(kernels::IntranodeDispatchArgs const&) { return "intranode_dispatch"; }
  static char const* kernel_name(kernels::IntranodeCombineArgs const&) { return "intranode_combine"; }
  static simt::LaunchStatus launch_grid(kernels::NotifyArgs const& args, simt::LaunchOptions options) {
    return kernels::launch_notify(args, std::move(options));
  }
  static simt::LaunchStatus launch_grid(kernels::IntranodeDispatchArgs const& args, simt::LaunchOptions options) {
    return kernels::launch_intranode_dispatch(args, std::move(options));
  }
  static simt::LaunchStatus launch_grid(kernels::IntranodeCombineArgs const& args, simt::LaunchOptions options) {
    return kernels::launch_intranode_combine(args, std::move(options));
  }
};

struct RegisterIntranode {
  RegisterIntranode() { intranode_entries::register_entries<CpuTarget>(); }
} const register_intranode;

}  // namespace

size_t intranode_workspace_bytes(int num_ranks, int num_local_experts, int num_topk, int max_row_bytes,
                                 int num_channels, int nvl_chunk_send_tokens, int nvl_ring_tokens) {
  kernels::KernelConfig const config{num_channels, nvl_chunk_send_tokens, nvl_ring_tokens};
  if (char const* problem = kernels::validate_config(config, num_ranks))
    throw RuntimeError(ErrorCode::kInvalidArgument, problem);
  return kernels::NvlWorkspace({num_ranks, num_local_experts, num_topk, max_row_bytes}, config).required_bytes();
}

std::string intranode_config_problem(int num_ranks, int num_channels, int nvl_chunk_send_tokens, int nvl_ring_tokens) {
  char const* problem = kernels::validate_config({num_channels, nvl_chunk_send_tokens, nvl_ring_tokens}, num_ranks);
  return problem != nullptr ? problem : "";
}

}  // namespace epcomm::runtime
