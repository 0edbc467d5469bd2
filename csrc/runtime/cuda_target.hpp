#pragma once
// How the cuda runtime runs a kernel entry (a Target of kernel_entries.hpp): grids are launched on the
// call's stream and either waited for (launch: polling the stream against a host-owned deadline, see
// wait_with_deadline), so a call returns with its outputs written, with the kernel's own error, or
// with a host timeout; or only issued (launch_only: the runtime's check_pending reads the ErrorSlot
// once an event after the grid has passed). The ErrorSlot is pinned, mapped host memory from a pool
// (allocated once, reused: no allocation, free or device-wide synchronization per call): the kernel
// writes it over PCIe, the host reads it once the grid is known to have ended. Shared by cuda_entries.cu (intranode)
// and gin_entries.cu (internode over NCCL GIN). No torch headers here.
//
// A launch goes through `cuda_launch_grid(args, stream, refused)`, found by argument-dependent lookup
// in epcomm::kernels: one overload per Args type, declared before the entries are registered.

#include <cuda_runtime.h>

#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../kernels/co_residency_check.hpp"
#include "../kernels/intranode.hpp"
#include "device_runtime.hpp"
#include "kernel_entries.hpp"
#include "reuse_pool.hpp"

namespace epcomm::kernels {

// notify is one block: nothing to refuse
inline int cuda_launch_grid(NotifyArgs const& args, void* stream, CoResidency*) {
  return cuda_launch_notify(args, stream);
}
inline int cuda_launch_grid(IntranodeDispatchArgs const& args, void* stream, CoResidency* refused) {
  return cuda_launch_intranode_dispatch(args, stream, refused);
}
inline int cuda_launch_grid(IntranodeCombineArgs const& args, void* stream, CoResidency* refused) {
  return cuda_launch_intranode_combine(args, stream, refused);
}

}  // namespace epcomm::kernels

namespace epcomm::runtime {

using entries::LaunchOutcome;

// Beyond twice the kernels' own timeout, the host's allowance for the launch and the work itself.
inline constexpr double kHostDeadlineSlackSeconds = 5.0;

inline std::string cuda_problem(char const* what, cudaError_t error) {
  return std::string(what) + " failed with " + cudaGetErrorName(error) + ": " + cudaGetErrorString(error);
}

// Mapped ErrorSlots, allocated once and reused by every later call (of every runtime of the process).
// Why not one cudaHostAlloc/cudaFreeHost pair per call: cudaFreeHost synchronizes the whole device
// (torch's compute streams and NCCL's included), which costs milliseconds, forbids overlap, and can
// deadlock ranks when another stream holds an in-flight collective. A slot is taken for a call and
// given back when the call has finished with it (the grid has ended: its stream was synchronized, or
// an event after it passed), so the pool holds as many slots as calls ever ran or were pending at once. They are never freed: a few
// hundred bytes of pinned memory per concurrent call, released with the process (freeing them from
// a static destructor would race the CUDA runtime's own teardown).
struct MappedErrorSlot {
  kernels::ErrorSlot* host = nullptr;
  kernels::ErrorSlot* device = nullptr;
};

class ErrorSlotPool {
 public:
  using Mapped = MappedErrorSlot;

  static ReusePool<Mapped>& instance() {
    static ReusePool<Mapped>* const pool = new ReusePool<Mapped>(allocate);  // never destroyed (see above)
    return *pool;
  }

 private:
  // The first call (or more calls at once than ever before): one allocation.
  static Mapped allocate() {
    Mapped slot;
    cudaError_t error = cudaHostAlloc(reinterpret_cast<void**>(&slot.host), sizeof(kernels::ErrorSlot), cudaHostAllocMapped);
    if (error == cudaSuccess) error = cudaHostGetDevicePointer(reinterpret_cast<void**>(&slot.device), slot.host, 0);
    if (error != cudaSuccess) throw RuntimeError(ErrorCode::kSystem, cuda_problem("cudaHostAlloc(ErrorSlot)", error));
    return slot;
  }
};

struct CudaTarget {
  static constexpr char const* kKind = "cuda";

  // A pooled mapped ErrorSlot, zeroed (a plain host store, complete before the launch is issued); for a call
  // capturing a CUDA graph, the runtime's captured-kernel slot instead, as it is (not zeroed: it may hold an
  // error not reported yet), never given back.
  class Slot {
   public:
    explicit Slot(KernelCall const& call) {
      if (call.capturing) {
        DeviceRuntime::MappedSlot const captured = call.runtime.captured_error_slot();
        slot_ = {static_cast<kernels::ErrorSlot*>(captured.host), static_cast<kernels::ErrorSlot*>(captured.device)};
        abandoned_ = true;  // the runtime's: never in the pool
        return;
      }
      slot_ = ErrorSlotPool::instance().take();
      *slot_.host = kernels::ErrorSlot{};
    }
    ~Slot() {
      if (!abandoned_) ErrorSlotPool::instance().give_back(slot_);
    }
    // The host stopped waiting for the grid: it may still write here, so the slot is never reused (leaked).
    void abandon() { abandoned_ = true; }
    Slot(Slot const&) = delete;
    Slot& operator=(Slot const&) = delete;
    kernels::ErrorSlot* kernel_view() { return slot_.device; }
    kernels::ErrorSlot read() const { return *slot_.host; }  // after the stream synchronized

   private:
    ErrorSlotPool::Mapped slot_;
    bool abandoned_ = false;
  };

  template <class Args>
  static LaunchOutcome launch(Args const& args, KernelCall const& call) {
    LaunchOutcome const issued = launch_only(args, call);
    if (!issued.problem.empty()) return issued;
    return wait_with_deadline(static_cast<cudaStream_t>(call.stream.native()), call.timeout_s);
  }

  // Issues the grid in the call's stream and returns (an empty problem: issued).
  template <class Args>
  static LaunchOutcome launch_only(Args const& args, KernelCall const& call) {
    kernels::CoResidency refused;
    // cuda_launch_grid: an overload per Args type in epcomm::kernels, found by argument-dependent lookup
    // (the intranode ones above; the GIN internode ones in gin_entries.cu)
    if (int const error = cuda_launch_grid(args, call.stream.native(), &refused); error != int(cudaSuccess)) {
      // Nothing was launched: the Config asks for more channels than this device holds at once
      if (error == kernels::kCoResidencyRefused)
        return {ErrorCode::kInvalidArgument, kernels::describe_co_residency(refused)};
      return {ErrorCode::kKernelFailed, cuda_problem("kernel launch", cudaError_t(error))};
    }
    return {ErrorCode::kKernelFailed, ""};
  }

  // Beyond twice the kernels' own timeout (their data waits), the host's allowance for the launch and the
  // work itself. An enqueued grid's deadline counts from its launch, so it also covers the work queued
  // before it in its stream (the caller's, when the stream is torch's): a longer queue needs a larger
  // timeout_s.
  static double host_deadline_s(double timeout_s) { return 2 * timeout_s + kHostDeadlineSlackSeconds; }

  // The host owns a deadline, not cudaStreamSynchronize: the kernels' own waits give up after
  // timeout_s (data waits after twice that), but a wait inside NCCL (a GIN flush or a put on a full
  // queue towards a dead peer) or a hung GPU never returns. Polls the stream (poll_until).
  static LaunchOutcome wait_with_deadline(cudaStream_t stream, double timeout_s) {
    double const limit_s = host_deadline_s(timeout_s);
    cudaError_t state = cudaErrorNotReady;
    bool const ended =
        poll_until([&] { return (state = cudaStreamQuery(stream)) != cudaErrorNotReady; }, deadline_after(limit_s));
    if (!ended)
      return {ErrorCode::kTimeout,
              "the kernel was still running " + std::to_string(int(limit_s)) + " s after launch although its own "
              "waits give up after " + std::to_string(timeout_s) + " s (a wait inside NCCL towards a dead peer, or a "
              "hung GPU); the host stopped waiting. The kernel may still be running: treat this process's CUDA "
              "context as unusable and restart the process",
              /*grid_may_still_run=*/true};
    if (state != cudaSuccess) return {ErrorCode::kKernelFailed, cuda_problem("cudaStreamQuery", state)};
    return {};
  }
};

static_assert(entries::DeviceTarget<CudaTarget>);

}  // namespace epcomm::runtime
