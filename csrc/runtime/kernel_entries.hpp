#pragma once
// How a device runtime runs a kernel, for both paths (intranode_entries.hpp, internode_entries.hpp)
// and both targets (cpu_entries.cpp, cuda_entries.cu):
//
//   Python: runtime.run(spec, params, timeout_s)          typed structs, fields set by name
//     -> DeviceRuntime::run<Params>                        finds the entry registered for Params
//     -> entry: Args = Params + the runtime's peer tables, error slot and timeout (the path's job)
//     -> launch_and_finish<Target>: validate(Args), Target::launch, ErrorSlot -> RuntimeError
//
// A Target says how one runtime kind launches and where the kernel's ErrorSlot lives:
//   struct Target {
//     static constexpr char const* kKind;                        // "cpu" / "cuda"
//     class Slot { ErrorSlot* kernel_view(); ErrorSlot read(); void abandon(); };
//       // zeroed, kernel-writable, host-readable; abandon(): a grid may still write it, never reuse it
//     static LaunchOutcome launch(Args const&, KernelCall const&);  // runs the grid to completion
//   };
// A failed kernel throws RuntimeError(kTimeout / kKernelFailed) with the ErrorSlot's description.

#include <concepts>
#include <string>

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
concept DeviceTarget = requires(typename T::Slot slot, typename T::Slot const& read_only) {
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
inline void finish(char const* name, KernelCall const& call, LaunchOutcome const& outcome,
                   kernels::ErrorSlot const& slot) {
  std::string const where = std::string("epcomm ") + name + " on rank " + std::to_string(call.runtime.rank()) + ": ";
  if (slot.code != 0) {
    char text[256];
    kernels::describe_error(slot, text, sizeof(text));
    ErrorCode const code =
        slot.code == int32_t(kernels::ErrorCode::kTimeout) ? ErrorCode::kTimeout : ErrorCode::kKernelFailed;
    throw RuntimeError(code, where + text);
  }
  if (!outcome.problem.empty()) throw RuntimeError(outcome.code, where + outcome.problem);
}

// Validates the kernel's Args (kernels/*_validate.hpp, found by ADL at instantiation), launches it on Target and reports its outcome.
// `host_gave_up()` runs when the host stopped waiting for a grid that may still run (its deadline), before
// the error is thrown: a transport's chance to end waits the kernel cannot bound (GIN aborts its communicator).
template <DeviceTarget Target, class Args, class HostGaveUp>
void launch_and_finish(KernelCall const& call, Args const& args, typename Target::Slot& slot, HostGaveUp&& host_gave_up) {
  if (char const* problem = validate(args)) throw invalid_argument(Args::kName, problem);
  LaunchOutcome const outcome = Target::launch(args, call);
  if (outcome.grid_may_still_run) {
    slot.abandon();
    host_gave_up();
  }
  finish(Args::kName, call, outcome, slot.read());
}

template <DeviceTarget Target, class Args>
void launch_and_finish(KernelCall const& call, Args const& args, typename Target::Slot& slot) {
  launch_and_finish<Target>(call, args, slot, [] {});
}

}  // namespace epcomm::runtime::entries
