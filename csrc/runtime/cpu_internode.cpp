// The internode kernels (kernels/internode.hpp) as cpu-runtime entries, for the sim backend on
// several (emulated) nodes: one process per rank, every rank's buffer mapped by every rank
// (POSIX shared memory), ShmTransport over those mappings standing in for the network. Each
// rank's data region is [NVL workspace | RDMA workspace at rdma_offset].
//
// Argument lists (every entry starts with the 14-int internode comm prefix):
//   comm:  num_channels, nvl_chunk_send_tokens, nvl_ring_tokens, rdma_chunk_tokens, rdma_ring_tokens,
//          ws_num_topk, ws_dispatch_row_bytes, ws_combine_hidden, ws_combine_row_bytes,
//          max_nodes_per_token, num_nvl_ranks, rdma_offset, byte_counters (uint64 [3] or 0), epoch_or_0
//   internode_notify:   comm..., exchange_counts, is_token_in_rank, num_tokens, recv_rank_prefix,
//                       recv_channel_prefix_matrix, forward_channel_prefix_matrix
//   internode_dispatch: comm..., x, hidden_bytes, x_scales, scale_bytes, topk_idx, topk_weights, num_topk,
//                       num_experts, num_tokens, is_token_in_rank, recv_channel_prefix_matrix,
//                       forward_channel_prefix_matrix, recv_x, recv_x_scales, recv_topk_idx,
//                       recv_topk_weights, recv_src_idx, forward_peer_masks
//   internode_combine:  comm..., x, element_kind, topk_weights, hidden, num_topk, num_tokens,
//                       is_token_in_rank, recv_channel_prefix_matrix, forward_channel_prefix_matrix,
//                       forward_peer_masks, combined_x, combined_topk_weights
// byte_counters: the transport adds the bytes this rank put per link class (self, nvlink, network).

#include <string>
#include <vector>

#include "../kernels/internode.hpp"
#include "../kernels/internode_validate.hpp"
#include "device_runtime.hpp"
#include "cpu_target.hpp"
#include "intranode_entries.hpp"

namespace epcomm::runtime {

namespace {

using intranode_entries::ArgReader;
using intranode_entries::check_count;
using transport::ShmTransport;

constexpr size_t kInternodeCommArgs = 14;

// One call's view of the peers: NVL buffers of this node, RDMA buffers of every rank.
struct InternodeCall {
  CpuTarget::Slot slot;
  std::vector<char*> rdma_buffers;
  kernels::ShmInternodeComm comm;

  explicit InternodeCall(KernelCall const& call) {
    std::vector<int64_t> const& a = call.args;
    DeviceRuntime const& runtime = call.runtime;
    kernels::InternodeConfig config;
    config.nvl = {int(a[0]), int(a[1]), int(a[2])};
    config.rdma_chunk_tokens = int(a[3]);
    config.rdma_ring_tokens = int(a[4]);
    int const num_topk = int(a[5]), dispatch_row_bytes = int(a[6]), combine_hidden = int(a[7]);
    int const combine_row_bytes = int(a[8]), max_nodes_per_token = int(a[9]), num_nvl_ranks = int(a[10]);
    size_t const rdma_offset = size_t(a[11]);
    int const num_ranks = runtime.num_ranks(), rank = runtime.rank();
    if (num_nvl_ranks < 1 || num_ranks % num_nvl_ranks != 0)
      throw RuntimeError(ErrorCode::kInvalidArgument, "internode kernels: num_nvl_ranks=" + std::to_string(num_nvl_ranks) +
                                                          " must divide num_ranks=" + std::to_string(num_ranks));
    kernels::RdmaWorkspaceShape const shape{num_ranks / num_nvl_ranks, num_nvl_ranks, 0, num_topk,
                                            dispatch_row_bytes, combine_hidden, max_nodes_per_token};
    if (char const* problem = kernels::validate_rdma_shape(shape, config))
      throw RuntimeError(ErrorCode::kInvalidArgument, std::string("internode kernels: ") + problem);
    comm.rank = rank;
    comm.num_ranks = num_ranks;
    comm.num_nvl_ranks = num_nvl_ranks;
    comm.config = config;
    comm.nvl_workspace = kernels::NvlWorkspace(
        {num_nvl_ranks, 0, num_topk, dispatch_row_bytes > combine_row_bytes ? dispatch_row_bytes : combine_row_bytes},
        config.nvl);
    comm.rdma_workspace = kernels::RdmaWorkspace(shape, config);
    if (comm.nvl_workspace.required_bytes() > rdma_offset ||
        rdma_offset + comm.rdma_workspace.required_bytes() > runtime.num_bytes())
      throw RuntimeError(ErrorCode::kInvalidArgument,
                         "internode kernels need " + std::to_string(comm.nvl_workspace.required_bytes()) +
                             " NVL bytes before rdma_offset=" + std::to_string(rdma_offset) + " and " +
                             std::to_string(comm.rdma_workspace.required_bytes()) + " RDMA bytes after it; the buffer has " +
                             std::to_string(runtime.num_bytes()) + " bytes");
    void* const* peers = runtime.device_peer_data_table();  // [R]: this node's ranks are contiguous
    comm.nvl_peer_buffers = peers + comm.node() * num_nvl_ranks;
    for (int r = 0; r < num_ranks; ++r) rdma_buffers.push_back(static_cast<char*>(peers[r]) + rdma_offset);
    comm.transport = ShmTransport{rank, num_ranks, num_nvl_ranks, rdma_buffers.data(),
                                  comm.rdma_workspace.signals_offset,
                                  ArgReader(a, 12).pointer<uint64_t>()};  // byte_counters
    comm.error = slot.kernel_view();
    comm.timeout_cycles = intranode_entries::timeout_cycles(call);
  }
  InternodeCall(InternodeCall const&) = delete;  // comm points into this object
};

void run_notify(KernelCall const& call) {
  check_count(call, "internode_notify", kInternodeCommArgs + 6);
  InternodeCall context(call);
  kernels::InternodeNotifyArgs<ShmTransport> args;
  args.comm = context.comm;
  args.epoch = call.args[kInternodeCommArgs - 1];
  ArgReader next(call.args, kInternodeCommArgs);
  args.exchange_counts = next.flag();
  args.is_token_in_rank = next.pointer<bool const>();
  args.num_tokens = next.integer();
  args.recv_rank_prefix = next.pointer<int32_t>();
  args.recv_channel_prefix_matrix = next.pointer<int32_t>();
  args.forward_channel_prefix_matrix = next.pointer<int32_t>();
  intranode_entries::launch_and_finish<CpuTarget>("internode_notify", call, args, context.slot);
}

void run_dispatch(KernelCall const& call) {
  check_count(call, "internode_dispatch", kInternodeCommArgs + 18);
  InternodeCall context(call);
  kernels::InternodeDispatchArgs<ShmTransport> args;
  args.comm = context.comm;
  ArgReader next(call.args, kInternodeCommArgs);
  intranode_entries::read_dispatch_inputs(next, args);
  args.max_nodes_per_token = context.comm.rdma_workspace.max_nodes_per_token;
  args.forward_channel_prefix_matrix = next.pointer<int32_t const>();
  intranode_entries::read_dispatch_outputs(next, args);
  args.forward_peer_masks = next.pointer<uint32_t>();
  intranode_entries::launch_and_finish<CpuTarget>("internode_dispatch", call, args, context.slot);
}

void run_combine(KernelCall const& call) {
  check_count(call, "internode_combine", kInternodeCommArgs + 12);
  InternodeCall context(call);
  kernels::InternodeCombineArgs<ShmTransport> args;
  args.comm = context.comm;
  ArgReader next(call.args, kInternodeCommArgs);
  intranode_entries::read_combine_inputs(next, args);
  args.forward_channel_prefix_matrix = next.pointer<int32_t const>();
  args.forward_peer_masks = next.pointer<uint32_t const>();
  args.combined_x = next.pointer<void>();
  args.combined_topk_weights = next.pointer<float>();
  intranode_entries::launch_and_finish<CpuTarget>("internode_combine", call, args, context.slot);
}

struct RegisterInternode {
  RegisterInternode() {
    register_kernel("cpu", "internode_notify", run_notify);
    register_kernel("cpu", "internode_dispatch", run_dispatch);
    register_kernel("cpu", "internode_combine", run_combine);
  }
} const register_internode;

}  // namespace

// The byte sizes of the two regions a call of this shape needs (NVL, then RDMA), for Python's sizing.
std::vector<size_t> internode_workspace_bytes(int num_ranks, int num_nvl_ranks, int num_topk, int dispatch_row_bytes,
                                              int combine_hidden, int combine_row_bytes, int max_nodes_per_token,
                                              int num_channels, int nvl_chunk_send_tokens, int nvl_ring_tokens,
                                              int rdma_chunk_tokens, int rdma_ring_tokens) {
  kernels::InternodeConfig config;
  config.nvl = {num_channels, nvl_chunk_send_tokens, nvl_ring_tokens};
  config.rdma_chunk_tokens = rdma_chunk_tokens;
  config.rdma_ring_tokens = rdma_ring_tokens;
  if (num_nvl_ranks < 1 || num_ranks % num_nvl_ranks != 0)
    throw RuntimeError(ErrorCode::kInvalidArgument, "num_nvl_ranks must divide num_ranks");
  kernels::RdmaWorkspaceShape const shape{num_ranks / num_nvl_ranks, num_nvl_ranks, 0, num_topk,
                                          dispatch_row_bytes, combine_hidden, max_nodes_per_token};
  if (char const* problem = kernels::validate_rdma_shape(shape, config))
    throw RuntimeError(ErrorCode::kInvalidArgument, problem);
  int const nvl_row = dispatch_row_bytes > combine_row_bytes ? dispatch_row_bytes : combine_row_bytes;
  return {kernels::NvlWorkspace({num_nvl_ranks, 0, num_topk, nvl_row}, config.nvl).required_bytes(),
          kernels::RdmaWorkspace(shape, config).required_bytes()};
}

}  // namespace epcomm::runtime
