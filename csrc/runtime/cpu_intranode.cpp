// The intranode kernels (kernels/intranode.hpp) as cpu-runtime kernel entries, for the sim backend
// (epcomm/backends/sim_backend.py). Python calls runtime.run_kernel(name, args, timeout_s) with
// int64 arguments: tensor pointers (data_ptr()), sizes, the kernel config and the workspace shape.
// The peer table comes from the runtime; the NVL buffer is the runtime's data region.
//
// Argument lists (every entry starts with the 7-int "comm" prefix):
//   comm:  num_channels, nvl_chunk_send_tokens, nvl_ring_tokens,
//          ws_num_local_experts, ws_num_topk, ws_max_row_bytes, epoch_or_0
//   intranode_notify:   comm..., exchange_counts, is_token_in_rank, num_tokens_per_expert (0: none),
//                       num_tokens, expert_alignment, recv_rank_prefix, recv_channel_prefix_matrix,
//                       num_recv_tokens_per_expert
//   intranode_dispatch: comm..., x, hidden_bytes, x_scales, scale_bytes, topk_idx, topk_weights, num_topk,
//                       num_experts, num_tokens, is_token_in_rank, recv_channel_prefix_matrix,
//                       recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx
//   intranode_combine:  comm..., x, element_kind (1 bf16, 2 fp16, 3 fp32), topk_weights, hidden, num_topk,
//                       num_tokens, is_token_in_rank, recv_channel_prefix_matrix, combined_x,
//                       combined_topk_weights
// A failed kernel throws RuntimeError(kTimeout / kKernelFailed) with the ErrorSlot's description.

#include <string>

#include "../kernels/intranode.hpp"
#include "device_runtime.hpp"

namespace epcomm::runtime {

namespace {

constexpr size_t kCommArgs = 7;

template <class T>
T* ptr(int64_t value) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(value));
}

void check_count(KernelCall const& call, char const* name, size_t expected) {
  if (call.args.size() != expected)
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string(name) + " takes " + std::to_string(expected) +
                                                        " arguments, got " + std::to_string(call.args.size()));
}

kernels::CommArgs make_comm(KernelCall const& call, kernels::ErrorSlot* slot) {
  std::vector<int64_t> const& a = call.args;
  kernels::CommArgs comm;
  comm.rank = call.runtime.rank();
  comm.num_ranks = call.runtime.num_ranks();
  comm.config = {int(a[0]), int(a[1]), int(a[2])};
  comm.workspace = kernels::NvlWorkspace({comm.num_ranks, int(a[3]), int(a[4]), int(a[5])}, comm.config);
  if (comm.workspace.required_bytes() > call.runtime.num_bytes())
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       "intranode kernels need a " + std::to_string(comm.workspace.required_bytes()) +
                           "-byte NVL buffer, this one has " + std::to_string(call.runtime.num_bytes()) + " bytes");
  comm.peer_buffers = call.runtime.device_peer_data_table();
  comm.error = slot;
  comm.timeout_cycles = (long long)(call.timeout_s * call.runtime.clock_ticks_per_second());
  if (comm.timeout_cycles <= 0) comm.timeout_cycles = 1;
  return comm;
}

void finish(char const* name, KernelCall const& call, simt::LaunchStatus const& status, kernels::ErrorSlot const& slot) {
  if (slot.code != 0) {
    char text[256];
    kernels::describe_error(slot, text, sizeof(text));
    ErrorCode const code = slot.code == int32_t(kernels::ErrorCode::kTimeout) ? ErrorCode::kTimeout : ErrorCode::kKernelFailed;
    throw RuntimeError(code, std::string("epcomm ") + name + " on rank " + std::to_string(call.runtime.rank()) + ": " + text);
  }
  if (status.ok()) return;
  ErrorCode code = ErrorCode::kKernelFailed;
  if (status.kind == simt::ErrorKind::Timeout) code = ErrorCode::kTimeout;
  if (status.kind == simt::ErrorKind::InvalidConfig) code = ErrorCode::kInvalidArgument;
  throw RuntimeError(code, std::string("epcomm ") + name + " on rank " + std::to_string(call.runtime.rank()) + ": " +
                               simt::error_kind_name(status.kind) + ": " + status.message);
}

simt::LaunchOptions options(char const* name, KernelCall const& call) {
  return kernels::default_launch_options(name, (long long)(call.timeout_s * call.runtime.clock_ticks_per_second()));
}

void run_notify(KernelCall const& call) {
  check_count(call, "intranode_notify", kCommArgs + 8);
  std::vector<int64_t> const& a = call.args;
  kernels::ErrorSlot slot{};
  kernels::NotifyArgs args;
  args.comm = make_comm(call, &slot);
  args.epoch = a[6];
  size_t i = kCommArgs;
  args.exchange_counts = a[i++] != 0;
  args.is_token_in_rank = ptr<bool const>(a[i++]);
  args.num_tokens_per_expert = ptr<int32_t const>(a[i++]);
  args.num_tokens = int(a[i++]);
  args.expert_alignment = int(a[i++]);
  args.recv_rank_prefix = ptr<int32_t>(a[i++]);
  args.recv_channel_prefix_matrix = ptr<int32_t>(a[i++]);
  args.num_recv_tokens_per_expert = ptr<int32_t>(a[i++]);
  finish("intranode_notify", call, kernels::launch_notify(args, options("intranode_notify", call)), slot);
}

void run_dispatch(KernelCall const& call) {
  check_count(call, "intranode_dispatch", kCommArgs + 16);
  std::vector<int64_t> const& a = call.args;
  kernels::ErrorSlot slot{};
  kernels::IntranodeDispatchArgs args;
  args.comm = make_comm(call, &slot);
  size_t i = kCommArgs;
  args.x = ptr<void const>(a[i++]);
  args.hidden_bytes = int(a[i++]);
  args.x_scales = ptr<void const>(a[i++]);
  args.scale_bytes = int(a[i++]);
  args.topk_idx = ptr<int64_t const>(a[i++]);
  args.topk_weights = ptr<float const>(a[i++]);
  args.num_topk = int(a[i++]);
  args.num_experts = int(a[i++]);
  args.num_tokens = int(a[i++]);
  args.is_token_in_rank = ptr<bool const>(a[i++]);
  args.recv_channel_prefix_matrix = ptr<int32_t const>(a[i++]);
  args.recv_x = ptr<void>(a[i++]);
  args.recv_x_scales = ptr<void>(a[i++]);
  args.recv_topk_idx = ptr<int64_t>(a[i++]);
  args.recv_topk_weights = ptr<float>(a[i++]);
  args.recv_src_idx = ptr<int32_t>(a[i++]);
  finish("intranode_dispatch", call,
         kernels::launch_intranode_dispatch(args, options("intranode_dispatch", call)), slot);
}

void run_combine(KernelCall const& call) {
  check_count(call, "intranode_combine", kCommArgs + 10);
  std::vector<int64_t> const& a = call.args;
  kernels::ErrorSlot slot{};
  kernels::IntranodeCombineArgs args;
  args.comm = make_comm(call, &slot);
  size_t i = kCommArgs;
  args.x = ptr<void const>(a[i++]);
  args.element_kind = kernels::ElementKind(a[i++]);
  args.topk_weights = ptr<float const>(a[i++]);
  args.hidden = int(a[i++]);
  args.num_topk = int(a[i++]);
  args.num_tokens = int(a[i++]);
  args.is_token_in_rank = ptr<bool const>(a[i++]);
  args.recv_channel_prefix_matrix = ptr<int32_t const>(a[i++]);
  args.combined_x = ptr<void>(a[i++]);
  args.combined_topk_weights = ptr<float>(a[i++]);
  finish("intranode_combine", call, kernels::launch_intranode_combine(args, options("intranode_combine", call)), slot);
}

struct RegisterIntranode {
  RegisterIntranode() {
    register_kernel("cpu", "intranode_notify", run_notify);
    register_kernel("cpu", "intranode_dispatch", run_dispatch);
    register_kernel("cpu", "intranode_combine", run_combine);
  }
} const register_intranode;

}  // namespace

size_t intranode_workspace_bytes(int num_ranks, int num_local_experts, int num_topk, int max_row_bytes,
                                 int num_channels, int nvl_chunk_send_tokens, int nvl_ring_tokens) {
  kernels::KernelConfig const config{num_channels, nvl_chunk_send_tokens, nvl_ring_tokens};
  if (char const* problem = kernels::validate_config(config, num_ranks))
    throw RuntimeError(ErrorCode::kInvalidArgument, problem);
  return kernels::NvlWorkspace({num_ranks, num_local_experts, num_topk, max_row_bytes}, config).required_bytes();
}

std::string intranode_config_problem(int num_ranks, int num_channels, int nvl_chunk_send_tokens, int nvl_ring_tokens) {
  char const* problem = kernels::validate_config({num_channels, nvl_chunk_send_tokens, nvl_ring_tokens}, num_ranks);
  return problem != nullptr ? problem : "";
}

}  // namespace epcomm::runtime
