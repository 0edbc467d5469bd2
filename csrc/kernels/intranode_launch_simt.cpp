// CPU-target launchers of the intranode kernels (epcomm::simt). The CUDA
// twins are in intranode_launch.cu; both launch the same kernel templates.
#include <algorithm>
#include <chrono>
#include <string>

#include "../common/compat.cuh"
#include "intranode.hpp"
#include "intranode_combine.cuh"
#include "intranode_dispatch.cuh"
#include "intranode_validate.hpp"
#include "layout.cuh"
#include "notify.cuh"
#include "simt_launch_util.hpp"

namespace epcomm::kernels {

namespace {

template <class Args>
simt::LaunchStatus launch_one(Args const& args, simt::LaunchOptions options,
                              void (*add)(simt::ConcurrentLaunch&, Args const&)) {
  if (char const* problem = validate(args)) return {simt::ErrorKind::InvalidConfig, std::string("epcomm: ") + problem};
  simt::ConcurrentLaunch launch(std::move(options));
  add(launch, args);
  return launch.try_run();
}

}  // namespace

simt::LaunchOptions default_launch_options(char const* name, long long timeout_cycles) {
  simt::LaunchOptions options;
  options.name = name;
  // clock64 counts nanoseconds on this target; the watchdog fires only if the kernel's own timeout did not
  long long const kernel_ms = std::max(1LL, timeout_cycles / 1'000'000);
  options.timeout = std::chrono::milliseconds(kernel_ms + 10'000);
  return options;
}

void add_notify(simt::ConcurrentLaunch& launch, NotifyArgs const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("notify", args.comm.rank), 1, kNotifyThreads, 0, notify_kernel, args);
}

void add_intranode_dispatch(simt::ConcurrentLaunch& launch, IntranodeDispatchArgs const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("intranode_dispatch", args.comm.rank), comm_num_blocks(args.comm.config),
             comm_block_threads(args.comm.num_ranks), 0, intranode_dispatch_kernel, args);
}

void add_intranode_combine(simt::ConcurrentLaunch& launch, IntranodeCombineArgs const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("intranode_combine", args.comm.rank), comm_num_blocks(args.comm.config),
             comm_block_threads(args.comm.num_ranks), 0, intranode_combine_kernel, args);
}

simt::LaunchStatus launch_get_dispatch_layout(LayoutArgs const& args, simt::LaunchOptions options) {
  if (char const* problem = validate(args)) return {simt::ErrorKind::InvalidConfig, std::string("epcomm: ") + problem};
  return simt::try_launch(options, layout_num_blocks(args.num_experts, args.num_ranks), kLayoutThreads, 0,
                          get_dispatch_layout_kernel, args);
}

simt::LaunchStatus launch_notify(NotifyArgs const& args, simt::LaunchOptions options) {
  return launch_one(args, std::move(options), add_notify);
}

simt::LaunchStatus launch_intranode_dispatch(IntranodeDispatchArgs const& args, simt::LaunchOptions options) {
  return launch_one(args, std::move(options), add_intranode_dispatch);
}

simt::LaunchStatus launch_intranode_combine(IntranodeCombineArgs const& args, simt::LaunchOptions options) {
  return launch_one(args, std::move(options), add_intranode_combine);
}

}  // namespace epcomm::kernels
