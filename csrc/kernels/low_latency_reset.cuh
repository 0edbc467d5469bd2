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

// The value signal `signal` reaches once every call counted in `args` has landed its one unit
// (low_latency.hpp: "Completion by counting"); the abort signal is never waited for.
template <class Transport>
EPCOMM_DEVICE uint64_t ll_signal_due(LowLatencyResetSignalsArgs<Transport> const& args, int signal) {
  LowLatencyLayout const& layout = args.comm.layout;
  int const num_experts = layout.num_experts();
  int64_t calls = 0;
  if (signal < num_experts) calls = args.dispatches_slot0;           // dispatch, slot 0: [L][R]
  else if (signal < 2 * num_experts) calls = args.dispatches_slot1;  // dispatch, slot 1
  else if (signal < 3 * num_experts) calls = args.combines_slot0;    // combine, slot 0: [E]
  else if (signal < 4 * num_experts) calls = args.combines_slot1;    // combine, slot 1
  return uint64_t(calls) * layout.signal_unit();
}

// One thread per signal (strided): wait for its due adds (giving up at once when the abort signal is set,
// reporting a timeout past timeout_cycles and then leaving the signal as it is), then zero it.
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
    if (!timed_out) comm.transport.reset_signal(signal);
  }
}

}  // namespace epcomm::kernels
