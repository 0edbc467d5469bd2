#pragma once
// How a device runtime runs a kernel, for both paths (intranode_entries.hpp, internode_entries.hpp)
// and both targets (cpu_entries.cpp, cuda_entries.cu):
//
//   Python: runtime.run(spec, params, timeout_s)          typed structs, fields set by name
//     -> DeviceRuntime::run<Params>                        finds the entry registered for Params
//     -> entry: Args = Params + the runtime's peer tables, error slot and timeout (the path's job)
//     -> launch_kernel<Target>: validate(Args), then
//          waiting:      Target::launch (runs the grid to completion), ErrorSlot -> RuntimeError
//          enqueue-only: Target::launch_only, the ErrorSlot kept as a PendingKernel that the runtime's
//                        check_pending reports once the stream passed it (its next call at the latest)
//
// A Target says how one runtime kind launches and where the kernel's ErrorSlot lives:
//   struct Target {
//     static constexpr char const* kKind;                        // "cpu" / "cuda"
//     class Slot { Slot(KernelCall const&); ErrorSlot* kernel_view(); ErrorSlot read(); void abandon(); };
//       // zeroed, kernel-writable, host-readable; abandon(): a grid may still write it, never reuse it;
//       // for a capturing call: the runtime's captured_error_slot (cuda)
//     static LaunchOutcome launch(Args const&, KernelCall const&);  // runs the grid to completion
//     static LaunchOutcome launch_only(Args const&, KernelCall const&);  // issues it in the call's stream
//       // (cpu: runs it to completion too; its streams run work at once)
//     static double host_deadline_s(double timeout_s);  // how long the host waits for a grid at most
//   };
// A failed kernel throws RuntimeError(kTimeout / kKernelFailed) with the ErrorSlot's description.

#include <concepts>
#include <memory>
#include <string>
#include <utility>

#include "../kernels/error.cuh"
#include "device_runtime.hpp"

namespace epcomm::runtime::entries {

// How a launch ended, before the ErrorSlot is read: ok, or the runtime's own failure.
struct LaunchOutcome {
  ErrorCode code = ErrorCode::kKernelFailed;
  std::string problem;              // empty: the grid ran to completion
  bool grid_may_still_run = false;  // the host stopped waiting (its deadline): never reuse the ErrorSlot
};

template <class T>
concept DeviceTarget = std::constructible_from<typename T::Slot, KernelCall const&> &&
                       requires(typename T::Slot slot, typename T::Slot const& read_only) {
  { T::kKind } -> std::convertible_to<char const*>;
  { slot.kernel_view() } -> std::same_as<kernels::ErrorSlot*>;
  { read_only.read() } -> std::same_as<kernels::ErrorSlot>;
  { slot.abandon() } -> std::same_as<void>;
};

inline long long timeout_cycles(KernelCall const& call) {
  long long const cycles = (long long)(call.timeout_s * call.runtime.clock_ticks_per_second());
  return cycles > 0 ? cycles : 1;
}

inline RuntimeError invalid_argument(char const* name, std::string const& problem) {
  return RuntimeError(ErrorCode::kInvalidArgument, std::string("epcomm ") + name + ": " + problem);
}

// Throws what a failed launch or kernel reported; returns when both are clean.
inline void finish(char const* name, int rank, LaunchOutcome const& outcome, kernels::ErrorSlot const& slot) {
  std::string const where = std::string("epcomm ") + name + " on rank " + std::to_string(rank) + ": ";
  if (slot.code != 0) {
    char text[256];
    kernels::describe_error(slot, text, sizeof(text));
    ErrorCode const code = slot.code == int32_t(kernels::ErrorCode::kTimeout)         ? ErrorCode::kTimeout
                           : slot.code == int32_t(kernels::ErrorCode::kCallRejected) ? ErrorCode::kCallRejected
                           : slot.code == int32_t(kernels::ErrorCode::kRecvOverflow) ? ErrorCode::kRecvOverflow
                                                                                      : ErrorCode::kKernelFailed;
    throw RuntimeError(code, where + text);
  }
  if (!outcome.problem.empty()) throw RuntimeError(outcome.code, where + outcome.problem);
}

// A kernel issued by launch_kernel without waiting: owns its ErrorSlot (the kernel writes it until it
// ends), a marker event recorded after it, and the transport's give-up action (a copy of the binding's).
template <DeviceTarget Target, class HostGaveUp>
class PendingLaunch final : public PendingKernel {
 public:
  // `marker`: an event recorded in the kernel's stream right after it.
  PendingLaunch(char const* name, KernelCall const& call, std::unique_ptr<typename Target::Slot> slot,
                std::unique_ptr<Event> marker, HostGaveUp host_gave_up)
      : name_(name),
        rank_(call.runtime.rank()),
        limit_s_(Target::host_deadline_s(call.timeout_s)),
        timeout_s_(call.timeout_s),
        deadline_(deadline_after(limit_s_)),
        slot_(std::move(slot)),
        marker_(std::move(marker)),
        host_gave_up_(std::move(host_gave_up)) {}
  ~PendingLaunch() override {
    if (!reported_) slot_->abandon();  // dropped unreported (the runtime went away): the grid may still write it
  }
  bool finished() override { return marker_->query(); }
  void report() override {
    reported_ = true;
    finish(name_, rank_, LaunchOutcome{ErrorCode::kKernelFailed, ""}, slot_->read());
  }
  void give_up() override {
    slot_->abandon();
    host_gave_up_();
    reported_ = true;
    throw RuntimeError(ErrorCode::kTimeout,
                       std::string("epcomm ") + name_ + " on rank " + std::to_string(rank_) + ": the kernel, enqueued " +
                           std::to_string(int(limit_s_)) + " s ago, has not finished although its own waits give up "
                           "after " + std::to_string(timeout_s_) + " s (a wait inside the transport towards a dead "
                           "peer, its stream blocked by other work, or a hung GPU); the host stopped waiting. Treat this "
                           "process's device context as unusable and restart the process");
  }
  HostClock::time_point deadline() const override { return deadline_; }

 private:
  char const* name_;
  int rank_;
  double limit_s_, timeout_s_;
  HostClock::time_point deadline_;
  std::unique_ptr<typename Target::Slot> slot_;
  std::unique_ptr<Event> marker_;
  HostGaveUp host_gave_up_;
  bool reported_ = false;
};

// Validates the kernel's Args (kernels/*_validate.hpp, found by ADL at instantiation), launches it on Target and,
// unless the call is enqueue-only, waits for it and reports its outcome. `host_gave_up()` runs when the host
// stopped waiting for a grid that may still run (its deadline), before the error is thrown: a transport's
// chance to end waits the kernel cannot bound (GIN aborts its communicator). An enqueue-only call keeps a
// copy of it for the PendingKernel; a launch the device refused throws at once either way.
template <DeviceTarget Target, class Args, class HostGaveUp>
void launch_kernel(KernelCall const& call, Args const& args, std::unique_ptr<typename Target::Slot> slot,
                   HostGaveUp host_gave_up) {
  if (char const* problem = validate(args)) throw invalid_argument(Args::kName, problem);
  if (!call.enqueue_only) {
    LaunchOutcome const outcome = Target::launch(args, call);
    if (outcome.grid_may_still_run) {
      slot->abandon();
      host_gave_up();
    }
    finish(Args::kName, call.runtime.rank(), outcome, slot->read());
    return;
  }
  LaunchOutcome const outcome = Target::launch_only(args, call);
  if (!outcome.problem.empty()) {  // nothing runs (cpu: the grid broke a SIMT rule or its watchdog fired)
    // a capturing call's slot is the runtime's captured one, which may hold a replay's error: not this launch's
    finish(Args::kName, call.runtime.rank(), outcome, call.capturing ? kernels::ErrorSlot{} : slot->read());
  }
  if (call.capturing) return;  // captured into a graph: its slot is the runtime's (report_captured reads it)
  std::unique_ptr<Event> marker;
  try {
    marker = call.runtime.create_marker();
    marker->record(call.stream);
  } catch (...) {  // the grid runs and may write the slot: never hand it to another call
    slot->abandon();
    throw;
  }
  call.runtime.defer(std::make_unique<PendingLaunch<Target, HostGaveUp>>(Args::kName, call, std::move(slot),
                                                                          std::move(marker), std::move(host_gave_up)));
}

template <DeviceTarget Target, class Args>
void launch_kernel(KernelCall const& call, Args const& args, std::unique_ptr<typename Target::Slot> slot) {
  launch_kernel<Target>(call, args, std::move(slot), [] {});
}

}  // namespace epcomm::runtime::entries
