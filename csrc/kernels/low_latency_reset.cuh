#pragma once
// low_latency_reset_signals (low_latency.hpp): zero this rank's LL transport signals through the
// transport's reset_signal, the same code on both targets (ShmTransport: a relaxed store into the
// signal word of the region; GinTransport: ncclGin::resetSignal, as the signals live in the GIN session,
// where zeroing the window does not reach), each once the adds still due to it have landed.
// No peers are touched: the ranks meet before and after (the caller).

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "low_latency_common.cuh"

namespace epcomm::kernels {

// The value signal `signal` reaches once every call counted in the region's generation words has landed its
// one unit (low_latency.hpp: "Completion by counting"); 0 without wait_for_due. The abort signal is never
// waited for.
template <class Transport>
EPCOMM_DEVICE uint64_t ll_signal_due(LowLatencyResetSignalsArgs<Transport> const& args, int signal) {
  LowLatencyComm<Transport> const& comm = args.comm;
  int const num_experts = comm.layout.num_experts();
  if (!args.wait_for_due || signal >= 4 * num_experts) return 0;
  int const group = signal / num_experts;  // dispatch slot 0, dispatch slot 1, combine slot 0, combine slot 1
  return *ll_generation(comm, group % 2, /*combine=*/group >= 2) * comm.layout.signal_unit();
}

// One thread per signal (strided): wait for its due adds (giving up at once when the abort signal is set,
// reporting a timeout past timeout_cycles and then leaving the signal as it is), then zero it (the abort
// signal only without wait_for_due).
template <class Transport>
EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(kLowLatencyThreads, 1)
    low_latency_reset_signals_kernel(LowLatencyResetSignalsArgs<Transport> args) {
  LowLatencyComm<Transport> const& comm = args.comm;
  int const num_threads = int(gridDim.x) * int(blockDim.x);
  for (int signal = int(blockIdx.x) * int(blockDim.x) + int(threadIdx.x); signal < comm.layout.num_signals();
       signal += num_threads) {
    uint64_t const due = ll_signal_due(args, signal);
    uint64_t observed = 0;
    bool timed_out = false;
    if (ll_spin_until(comm, signal, due, ptx::read_clock64(), &observed) == LowLatencyWait::kTimeout) {
      WaitContext const context = ll_context(comm, KernelId::kLowLatencyResetSignals, Role::kSignalReset, signal, -1);
      report_failure(context, ErrorCode::kTimeout, int64_t(due), int64_t(observed));
      timed_out = true;
    }
    // Waiting, the abort signal stays set: a thread still spinning must see it (it polls it only now and then);
    // the clean's pass without the wait clears it
    bool const keeps_abort = args.wait_for_due && signal >= 4 * comm.layout.num_experts();
    if (!timed_out && !keeps_abort) comm.transport.reset_signal(signal);
  }
}

}  // namespace epcomm::kernels
