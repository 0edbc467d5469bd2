#pragma once
// Host-side checks of the low-latency Args structs (low_latency.hpp), shared by the CUDA and CPU
// launchers. Each returns nullptr when usable, else a message naming the field, its value and the rule
// (formatted into a per-thread buffer: copy it before the next call on the same thread).

#include <climits>
#include <cstdint>

#include "internode_validate.hpp"
#include "low_latency.hpp"

namespace epcomm::kernels {

// The workspace shape (num_max_tokens M, hidden H, num_ranks R, num_local_experts L), before any sizing.
inline char const* validate_low_latency_shape(int num_max_tokens, int hidden, int num_ranks, int num_local_experts) {
  using detail::invalid;
  if (num_ranks < 1) return invalid("low_latency: num_ranks=%d must be >= 1", num_ranks);
  if (num_local_experts < 1) return invalid("low_latency: num_local_experts=%d must be >= 1", num_local_experts);
  if (num_max_tokens < 1) return invalid("low_latency: num_max_tokens=%d must be >= 1", num_max_tokens);
  if (hidden < 8 || hidden % 8 != 0)
    return invalid("low_latency: hidden=%d must be a positive multiple of 8 (rows move as 16-byte vectors)", hidden);
  int64_t const rows = int64_t(num_local_experts) * num_ranks * num_max_tokens;
  if (rows > INT32_MAX)
    return invalid("low_latency: num_local_experts * num_ranks * num_max_tokens = %lld rows exceed int32 (row indices, "
                   "layout_range halves)", static_cast<long long>(rows));
  if (int64_t(num_ranks) * num_local_experts * 4 + 1 > INT32_MAX)
    return "low_latency: 4 * num_experts + 1 signals exceed int32";
  return nullptr;
}

template <class Transport>
char const* validate(LowLatencyComm<Transport> const& comm) {
  using detail::invalid;
  LowLatencyLayout const& layout = comm.layout;
  if (char const* problem =
          validate_low_latency_shape(layout.num_max_tokens, layout.hidden, layout.num_ranks, layout.num_local_experts))
    return problem;
  if (layout.num_ranks != comm.num_ranks)
    return invalid("low_latency: the layout was made for num_ranks=%d, the call has %d", layout.num_ranks, comm.num_ranks);
  if (comm.rank < 0 || comm.rank >= comm.num_ranks)
    return invalid("low_latency: rank=%d must be in [0, num_ranks=%d)", comm.rank, comm.num_ranks);
  if (layout.region_offset % kRegionAlignment != 0)
    return invalid("low_latency: region_offset=%zu must be a multiple of %zu", layout.region_offset, kRegionAlignment);
  if (comm.timeout_cycles <= 0) return "low_latency: timeout_cycles must be > 0";
  return nullptr;
}

namespace detail {
inline bool aligned16(void const* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

inline char const* check_slot(char const* kernel, int slot) {
  if (slot != 0 && slot != 1) return invalid("%s: slot=%d must be 0 or 1", kernel, slot);
  return nullptr;
}

inline char const* check_tokens(char const* kernel, int num_tokens, int num_topk, int num_max_tokens) {
  if (num_tokens < 0 || num_tokens > num_max_tokens)
    return invalid("%s: num_tokens=%d must be in [0, num_max_tokens=%d]", kernel, num_tokens, num_max_tokens);
  if (num_topk < 1 || num_topk > kMaxLowLatencyTopk)
    return invalid("%s: num_topk=%d must be in [1, %d]", kernel, num_topk, kMaxLowLatencyTopk);
  return nullptr;
}

// use_fp8 / use_ue8m0 (and round_scale where the kernel takes it) against hidden.
inline char const* check_format(char const* kernel, bool use_fp8, bool round_scale, bool use_ue8m0, int hidden) {
  if (use_fp8 && hidden % kLowLatencyScaleBlock != 0)
    return invalid("%s: use_fp8 needs hidden=%d to be a multiple of %d (one scale per 1 x 128 block)", kernel, hidden,
                   kLowLatencyScaleBlock);
  if (round_scale && !use_fp8) return invalid("%s: round_scale needs use_fp8", kernel);
  if (use_ue8m0 && (!use_fp8 || !round_scale))
    return invalid("%s: use_ue8m0 needs use_fp8 and round_scale", kernel);
  if (use_ue8m0 && hidden % (kLowLatencyScaleBlock * kLowLatencyUe8m0Group) != 0)
    return invalid("%s: use_ue8m0 needs hidden=%d to be a multiple of 512 (four block exponents per int32)", kernel,
                   hidden);
  return nullptr;
}

}  // namespace detail

template <class Transport>
char const* validate(LowLatencyDispatchSendArgs<Transport> const& args) {
  using namespace detail;
  char const* const kernel = LowLatencyDispatchSendParams::kName;
  if (char const* problem = validate(args.comm)) return problem;
  int const hidden = args.comm.layout.hidden;
  if (char const* problem = check_slot(kernel, args.slot)) return problem;
  if (char const* problem = check_tokens(kernel, args.num_tokens, args.num_topk, args.comm.layout.num_max_tokens))
    return problem;
  if (char const* problem = check_format(kernel, args.use_fp8, args.round_scale, args.use_ue8m0, hidden)) return problem;
  if (args.num_tokens > 0 && (args.x == nullptr || args.topk_idx == nullptr || args.slot_of == nullptr))
    return invalid("%s: x / topk_idx / slot_of is null", kernel);
  if (!aligned16(args.x)) return invalid("%s: x must be 16-byte aligned", kernel);
  return nullptr;
}

template <class Transport>
char const* validate(LowLatencyDispatchRecvArgs<Transport> const& args) {
  using namespace detail;
  char const* const kernel = LowLatencyDispatchRecvParams::kName;
  if (char const* problem = validate(args.comm)) return problem;
  if (char const* problem = check_slot(kernel, args.slot)) return problem;
  if (char const* problem = check_format(kernel, args.use_fp8, args.use_ue8m0, args.use_ue8m0, args.comm.layout.hidden))
    return problem;
  if (args.recv_x == nullptr || args.recv_count == nullptr || args.src_info == nullptr || args.layout_range == nullptr)
    return invalid("%s: recv_x / recv_count / src_info / layout_range is null", kernel);
  if (!aligned16(args.recv_x)) return invalid("%s: recv_x must be 16-byte aligned", kernel);
  if (args.use_fp8 && (args.recv_x_scales == nullptr || reinterpret_cast<uintptr_t>(args.recv_x_scales) % 4 != 0))
    return invalid("%s: use_fp8 needs recv_x_scales (4-byte aligned)", kernel);
  return nullptr;
}

template <class Transport>
char const* validate(LowLatencyCombineSendArgs<Transport> const& args) {
  using namespace detail;
  char const* const kernel = LowLatencyCombineSendParams::kName;
  if (char const* problem = validate(args.comm)) return problem;
  if (char const* problem = check_slot(kernel, args.slot)) return problem;
  if (args.x == nullptr || args.layout_range == nullptr) return invalid("%s: x / layout_range is null", kernel);
  if (!aligned16(args.x)) return invalid("%s: x must be 16-byte aligned", kernel);
  return nullptr;
}

template <class Transport>
char const* validate(LowLatencyCombineRecvArgs<Transport> const& args) {
  using namespace detail;
  char const* const kernel = LowLatencyCombineRecvParams::kName;
  if (char const* problem = validate(args.comm)) return problem;
  if (char const* problem = check_slot(kernel, args.slot)) return problem;
  if (char const* problem = check_tokens(kernel, args.num_tokens, args.num_topk, args.comm.layout.num_max_tokens))
    return problem;
  if (args.num_tokens > 0 &&
      (args.topk_idx == nullptr || args.topk_weights == nullptr || args.slot_of == nullptr || args.out == nullptr))
    return invalid("%s: topk_idx / topk_weights / slot_of / out is null", kernel);
  if (!aligned16(args.out)) return invalid("%s: out must be 16-byte aligned", kernel);
  return nullptr;
}

template <class Transport>
char const* validate(LowLatencyResetSignalsArgs<Transport> const& args) {
  if (char const* problem = validate(args.comm)) return problem;
  return nullptr;
}

}  // namespace epcomm::kernels
