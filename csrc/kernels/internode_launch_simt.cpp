// CPU-target launchers of the internode kernels (epcomm::simt) over ShmTransport.
// The CUDA twins are in internode_launch.cu; both launch the same kernel templates.
#include "../common/compat.cuh"
#include "internode.hpp"
#include "internode_combine.cuh"
#include "internode_dispatch.cuh"
#include "internode_notify.cuh"
#include "internode_validate.hpp"
#include "simt_launch_util.hpp"

namespace epcomm::kernels {

using transport::ShmTransport;

void add_internode_notify(simt::ConcurrentLaunch& launch, InternodeNotifyArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("internode_notify", args.comm.rank), kInternodeNotifyBlocks, kInternodeNotifyThreads,
             0, internode_notify_kernel<ShmTransport>, args);
}

void add_internode_dispatch(simt::ConcurrentLaunch& launch, InternodeDispatchArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("internode_dispatch", args.comm.rank), internode_num_blocks(args.comm.config),
             internode_block_threads(args.comm.num_ranks / args.comm.num_nvl_ranks, args.comm.num_nvl_ranks), 0,
             internode_dispatch_kernel<ShmTransport>, args);
}

void add_internode_combine(simt::ConcurrentLaunch& launch, InternodeCombineArgs<ShmTransport> const& args) {
  throw_if_invalid(args);
  launch.add(rank_grid_name("internode_combine", args.comm.rank), internode_num_blocks(args.comm.config),
             internode_block_threads(args.comm.num_ranks / args.comm.num_nvl_ranks, args.comm.num_nvl_ranks), 0,
             internode_combine_kernel<ShmTransport>, args);
}

}  // namespace epcomm::kernels
