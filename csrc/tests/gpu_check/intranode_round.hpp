#pragma once
// One intranode round on R fake ranks of a Device: layout, notify (counts + call check), dispatch,
// notify (barrier), combine; every output compared with the host reference (problem.hpp). Throws
// CheckFailed naming the first difference, a refused launch, or a kernel's ErrorSlot.

#include "../../kernels/intranode.hpp"
#include "device.hpp"
#include "problem.hpp"

namespace epcomm::gpu_check {

struct RoundTimes {
  double dispatch_s = 0, combine_s = 0;  // the dispatch and combine steps (all ranks, launch to last grid's end)
};

RoundTimes run_intranode_round(Device& device, Problem const& problem, kernels::KernelConfig const& config,
                               double timeout_s);

// The host's limit for a step whose kernels give up after timeout_s: the cuda backend's own
// (runtime/cuda_entries.cu: twice the kernel timeout, as data waits may take that, plus 5 s).
inline double host_limit_s(double timeout_s) { return 2 * timeout_s + 5; }

}  // namespace epcomm::gpu_check
