// The intranode kernels as cuda-runtime entries (intranode_entries.hpp), for the cuda backend
// (epcomm/backends/cuda_backend.py), launched through CudaTarget (cuda_target.hpp: the call's stream,
// a host-owned deadline, pooled mapped ErrorSlots). The internode entries over NCCL GIN register
// themselves in gin_entries.cu (built when NCCL's headers are found). No torch headers here.

#include "cuda_target.hpp"
#include "intranode_entries.hpp"

namespace epcomm::runtime {

namespace {

struct RegisterIntranode {
  RegisterIntranode() { entries::register_intranode_entries<CudaTarget>(); }
} const register_intranode;

}  // namespace

}  // namespace epcomm::runtime
