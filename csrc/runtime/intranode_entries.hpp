#pragma once
// The intranode kernels (kernels/intranode.hpp) as run_kernel entries of a device runtime, shared
// by the cpu runtime (cpu_intranode.cpp, SIMT layer) and the cuda runtime (cuda_intranode.cu).
// Python calls runtime.run_kernel(name, args, timeout_s) with int64 arguments: tensor pointers
// (data_ptr(), host memory on cpu, device memory on cuda), sizes, the kernel config and the
// workspace shape. The peer table comes from the runtime; the NVL buffer is its data region.
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
//
// A Target says how one runtime kind launches and where the kernel's ErrorSlot lives:
//   struct Target {
//     static constexpr char const* kKind;                       // "cpu" / "cuda"
//     class Slot { ErrorSlot* kernel_view(); ErrorSlot read(); }; // zeroed, kernel-writable, host-readable
//     static LaunchOutcome launch(char const* name, Args const&, KernelCall const&);  // runs the grid to completion
//   };

#include <string>

#include "../kernels/intranode.hpp"
#include "../kernels/intranode_validate.hpp"
#include "device_runtime.hpp"

namespace epcomm::runtime::intranode_entries {

inline constexpr size_t kCommArgs = 7;

// How a launch ended, before the ErrorSlot is read: ok, or the runtime's own failure.
struct LaunchOutcome {
  ErrorCode code = ErrorCode::kKernelFailed;
  std::string problem;  // empty: the grid ran to completion
};

// Reads an entry's arguments in order, from `first` (the end of its comm prefix).
class ArgReader {
 public:
  explicit ArgReader(std::vector<int64_t> const& args, size_t first = kCommArgs) : args_(args), next_(first) {}
  template <class T>
  T* pointer() {
    return reinterpret_cast<T*>(static_cast<intptr_t>(args_[next_++]));
  }
  int integer() { return int(args_[next_++]); }
  bool flag() { return args_[next_++] != 0; }

 private:
  std::vector<int64_t> const& args_;
  size_t next_;
};

inline void check_count(KernelCall const& call, char const* name, size_t expected) {
  if (call.args.size() != expected)
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string(name) + " takes " + std::to_string(expected) +
                                                        " arguments, got " + std::to_string(call.args.size()));
}

inline long long timeout_cycles(KernelCall const& call) {
  long long const cycles = (long long)(call.timeout_s * call.runtime.clock_ticks_per_second());
  return cycles > 0 ? cycles : 1;
}

inline kernels::CommArgs make_comm(KernelCall const& call, kernels::ErrorSlot* slot) {
  std::vector<int64_t> const& a = call.args;
  kernels::CommArgs comm;
  comm.rank = call.runtime.rank();
  comm.num_ranks = call.runtime.num_ranks();
  comm.config = {int(a[0]), int(a[1]), int(a[2])};
  if (char const* problem = kernels::validate_config(comm.config, comm.num_ranks))
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string("intranode kernels: ") + problem);
  comm.workspace = kernels::NvlWorkspace({comm.num_ranks, int(a[3]), int(a[4]), int(a[5])}, comm.config);
  if (comm.workspace.required_bytes() > call.runtime.num_bytes())
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       "intranode kernels need a " + std::to_string(comm.workspace.required_bytes()) +
                           "-byte NVL buffer, this one has " + std::to_string(call.runtime.num_bytes()) + " bytes");
  comm.peer_buffers = call.runtime.device_peer_data_table();
  comm.error = slot;
  comm.timeout_cycles = timeout_cycles(call);
  return comm;
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

template <class Target, class Args>
void launch_and_finish(char const* name, KernelCall const& call, Args const& args,
                       typename Target::Slot const& slot) {
  if (char const* problem = kernels::validate(args))
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string("epcomm ") + name + ": " + problem);
  LaunchOutcome const outcome = Target::launch(name, args, call);
  finish(name, call, outcome, slot.read());
}

// The argument runs the dispatch and combine entries of both paths share, in their order.
template <class Args>
void read_dispatch_inputs(ArgReader& next, Args& args) {  // x ... recv_channel_prefix_matrix
  args.x = next.pointer<void const>();
  args.hidden_bytes = next.integer();
  args.x_scales = next.pointer<void const>();
  args.scale_bytes = next.integer();
  args.topk_idx = next.pointer<int64_t const>();
  args.topk_weights = next.pointer<float const>();
  args.num_topk = next.integer();
  args.num_experts = next.integer();
  args.num_tokens = next.integer();
  args.is_token_in_rank = next.pointer<bool const>();
  args.recv_channel_prefix_matrix = next.pointer<int32_t const>();
}

template <class Args>
void read_dispatch_outputs(ArgReader& next, Args& args) {  // recv_x ... recv_src_idx
  args.recv_x = next.pointer<void>();
  args.recv_x_scales = next.pointer<void>();
  args.recv_topk_idx = next.pointer<int64_t>();
  args.recv_topk_weights = next.pointer<float>();
  args.recv_src_idx = next.pointer<int32_t>();
}

template <class Args>
void read_combine_inputs(ArgReader& next, Args& args) {  // x ... recv_channel_prefix_matrix
  args.x = next.pointer<void const>();
  args.element_kind = kernels::ElementKind(next.integer());
  args.topk_weights = next.pointer<float const>();
  args.hidden = next.integer();
  args.num_topk = next.integer();
  args.num_tokens = next.integer();
  args.is_token_in_rank = next.pointer<bool const>();
  args.recv_channel_prefix_matrix = next.pointer<int32_t const>();
}

template <class Target>
void run_notify(KernelCall const& call) {
  check_count(call, "intranode_notify", kCommArgs + 8);
  typename Target::Slot slot;
  kernels::NotifyArgs args;
  args.comm = make_comm(call, slot.kernel_view());
  args.epoch = call.args[kCommArgs - 1];
  ArgReader next(call.args);
  args.exchange_counts = next.flag();
  args.is_token_in_rank = next.pointer<bool const>();
  args.num_tokens_per_expert = next.pointer<int32_t const>();
  args.num_tokens = next.integer();
  args.expert_alignment = next.integer();
  args.recv_rank_prefix = next.pointer<int32_t>();
  args.recv_channel_prefix_matrix = next.pointer<int32_t>();
  args.num_recv_tokens_per_expert = next.pointer<int32_t>();
  launch_and_finish<Target>("intranode_notify", call, args, slot);
}

template <class Target>
void run_dispatch(KernelCall const& call) {
  check_count(call, "intranode_dispatch", kCommArgs + 16);
  typename Target::Slot slot;
  kernels::IntranodeDispatchArgs args;
  args.comm = make_comm(call, slot.kernel_view());
  ArgReader next(call.args);
  read_dispatch_inputs(next, args);
  read_dispatch_outputs(next, args);
  launch_and_finish<Target>("intranode_dispatch", call, args, slot);
}

template <class Target>
void run_combine(KernelCall const& call) {
  check_count(call, "intranode_combine", kCommArgs + 10);
  typename Target::Slot slot;
  kernels::IntranodeCombineArgs args;
  args.comm = make_comm(call, slot.kernel_view());
  ArgReader next(call.args);
  read_combine_inputs(next, args);
  args.combined_x = next.pointer<void>();
  args.combined_topk_weights = next.pointer<float>();
  launch_and_finish<Target>("intranode_combine", call, args, slot);
}

// Registers the three entries for Target's runtime kind.
template <class Target>
void register_entries() {
  register_kernel(Target::kKind, "intranode_notify", run_notify<Target>);
  register_kernel(Target::kKind, "intranode_dispatch", run_dispatch<Target>);
  register_kernel(Target::kKind, "intranode_combine", run_combine<Target>);
}

}  // namespace epcomm::runtime::intranode_entries
