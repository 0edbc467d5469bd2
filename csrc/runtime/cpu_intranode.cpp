// The intranode kernels as cpu-runtime entries (intranode_entries.hpp), for the sim backend
// (epcomm/backends/sim_backend.py): grids run through the SIMT layer on the calling thread.

#include <string>

#include "../kernels/intranode.hpp"
#include "device_runtime.hpp"
#include "cpu_target.hpp"
#include "intranode_entries.hpp"

namespace epcomm::runtime {

namespace {

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
