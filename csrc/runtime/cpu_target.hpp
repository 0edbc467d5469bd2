#pragma once
// How the cpu runtime runs a kernel entry (a Target of kernel_entries.hpp): the grid of this rank
// runs to completion on the calling thread through the SIMT layer; the kernel writes its ErrorSlot
// straight into host memory. Serves the intranode, internode and low-latency entries (cpu_entries.cpp).

#include <string>

#include "../kernels/internode.hpp"
#include "../kernels/intranode.hpp"
#include "../kernels/low_latency.hpp"
#include "device_runtime.hpp"
#include "kernel_entries.hpp"

namespace epcomm::runtime {

struct CpuTarget {
  static constexpr char const* kKind = "cpu";

  class Slot {
   public:
    explicit Slot(KernelCall const& /*the cpu runtime never captures*/) {}
    kernels::ErrorSlot* kernel_view() { return &slot_; }
    kernels::ErrorSlot read() const { return slot_; }
    void abandon() {}  // a CPU launch returns when its grid has finished

   private:
    kernels::ErrorSlot slot_{};
  };

  template <class Args>
  static entries::LaunchOutcome launch(Args const& args, KernelCall const& /*cpu streams run now, here*/) {
    simt::ConcurrentLaunch grid(kernels::default_launch_options(Args::kName, args.comm.timeout_cycles));
    add_grid(grid, args);
    simt::LaunchStatus const status = grid.try_run();
    if (status.ok()) return {};
    ErrorCode code = ErrorCode::kKernelFailed;
    if (status.kind == simt::ErrorKind::Timeout) code = ErrorCode::kTimeout;
    if (status.kind == simt::ErrorKind::InvalidConfig) code = ErrorCode::kInvalidArgument;
    return {code, std::string(simt::error_kind_name(status.kind)) + ": " + status.message};
  }
  // cpu streams run work at once: an enqueued grid has finished when this returns (its ErrorSlot is
  // still read later, by check_pending, as on cuda)
  template <class Args>
  static entries::LaunchOutcome launch_only(Args const& args, KernelCall const& call) {
    return launch(args, call);
  }
  static double host_deadline_s(double timeout_s) { return timeout_s; }  // never reached: grids have finished

 private:
  using Shm = transport::ShmTransport;
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::NotifyArgs const& args) { kernels::add_notify(grid, args); }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::IntranodeDispatchArgs const& args) {
    kernels::add_intranode_dispatch(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::IntranodeCombineArgs const& args) {
    kernels::add_intranode_combine(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::InternodeNotifyArgs<Shm> const& args) {
    kernels::add_internode_notify(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::InternodeDispatchArgs<Shm> const& args) {
    kernels::add_internode_dispatch(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::InternodeCombineArgs<Shm> const& args) {
    kernels::add_internode_combine(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::LowLatencyDispatchSendArgs<Shm> const& args) {
    kernels::add_low_latency_dispatch_send(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::LowLatencyDispatchRecvArgs<Shm> const& args) {
    kernels::add_low_latency_dispatch_recv(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::LowLatencyCombineSendArgs<Shm> const& args) {
    kernels::add_low_latency_combine_send(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::LowLatencyCombineRecvArgs<Shm> const& args) {
    kernels::add_low_latency_combine_recv(grid, args);
  }
  static void add_grid(simt::ConcurrentLaunch& grid, kernels::LowLatencyResetSignalsArgs<Shm> const& args) {
    kernels::add_low_latency_reset_signals(grid, args);
  }
};
static_assert(entries::DeviceTarget<CpuTarget>);

}  // namespace epcomm::runtime
