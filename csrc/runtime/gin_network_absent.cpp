// gin_network.hpp in a build without NCCL's headers (setup.py found no nvidia-nccl wheel and no
// NCCL_HOME): the cuda runtime then runs on one node only, and across nodes every rank says why.

#include <string>

#include "cuda_low_latency.hpp"
#include "gin_network.hpp"

namespace epcomm::runtime {

namespace {

[[noreturn]] void no_gin() {
  throw RuntimeError(ErrorCode::kNoDevice,
                     "this epcomm._C_cuda was built without NCCL's headers (nccl.h, nccl_device.h), so it has no "
                     "network between nodes (NCCL GIN): install torch's nvidia-nccl wheel (or set NCCL_HOME) and "
                     "rebuild, or use backend='torch' across nodes");
}

}  // namespace

bool gin_network_built() { return false; }

NetworkId create_network_id() { no_gin(); }

struct GinNetwork::State {};

GinNetwork::GinNetwork(NetworkId const&, int, int, size_t, int, double) { no_gin(); }
GinNetwork::~GinNetwork() = default;
transport::GinTransport const& GinNetwork::transport() const { no_gin(); }
char* GinNetwork::local_buffer() const { no_gin(); }
size_t GinNetwork::rdma_bytes() const { return 0; }
int GinNetwork::num_signals() const { return 0; }
bool GinNetwork::usable() const { return false; }
void GinNetwork::close(double) {}
void GinNetwork::abort() noexcept {}

namespace entries {

// Across nodes the LL kernels go through GIN (cuda_low_latency.hpp); a runtime of this build never has a
// network (open_network throws first), so these are never reached but say why if they were.
template <template <class> class Args>
void run_low_latency_over_gin(KernelCall const&, kernels::LowLatencySpec const&,
                              typename Args<transport::ShmTransport>::Params const&) {
  no_gin();
}

#define EPCOMM_INSTANTIATE(Args)                                                                          \
  template void run_low_latency_over_gin<kernels::Args>(KernelCall const&, kernels::LowLatencySpec const&, \
                                                        kernels::Args<transport::ShmTransport>::Params const&);
EPCOMM_FOR_EACH_LOW_LATENCY_KERNEL(EPCOMM_INSTANTIATE)
#undef EPCOMM_INSTANTIATE

}  // namespace entries

}  // namespace epcomm::runtime
