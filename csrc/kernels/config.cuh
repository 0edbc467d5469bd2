#pragma once
// Runtime-shaped tuning knobs shared by notify, dispatch and combine.
// Every field is a runtime value (no template switch over rank counts); the
// layout object (workspace.cuh) turns them into buffer offsets.

#include <cstdint>

#include "../common/compat.cuh"
#include "../common/fields.hpp"

namespace epcomm::kernels {

// Limits of the intranode kernels, with the reason for each.
inline constexpr int kMaxNvlRanks = 32;            // one warp per peer, peers indexed by lane
inline constexpr int kMaxChannels = 512;           // two blocks per channel
inline constexpr int kMaxCombineBatchTokens = 32;  // tokens the combine receiver reduces per round

#define EPCOMM_KERNEL_CONFIG_FIELDS(F)                                                                \
  F(int, num_channels, 1, "channels per rank; each is a (sender block, receiver block) pair")      \
  F(int, nvl_chunk_send_tokens, 4, "rows a sender writes before it publishes its tail")          \
  F(int, nvl_ring_tokens, 16, "row slots per (channel, source) ring, on the receiver's side")
struct KernelConfig {
  EPCOMM_KERNEL_CONFIG_FIELDS(EPCOMM_DECLARE_FIELD)
  bool operator==(KernelConfig const&) const = default;
};

// nullptr when `config` is usable with `num_ranks` NVLink peers, else a static message naming the rule.
EPCOMM_HOST_DEVICE char const* validate_config(KernelConfig const& config, int num_ranks) {
  if (num_ranks < 1 || num_ranks > kMaxNvlRanks) return "num_ranks must be in [1, 32] (one warp per peer)";
  if (config.num_channels < 1 || config.num_channels > kMaxChannels) return "num_channels must be in [1, 512]";
  if (config.nvl_chunk_send_tokens < 1) return "nvl_chunk_send_tokens must be >= 1";
  if (config.nvl_ring_tokens < config.nvl_chunk_send_tokens)
    return "nvl_ring_tokens must be >= nvl_chunk_send_tokens (a sender waits for a chunk of free slots)";
  return nullptr;
}

EPCOMM_HOST_DEVICE int min_int(int a, int b) { return a < b ? a : b; }

// Tokens [begin, end) of `channel`: contiguous ranges of the source's tokens, sizes differing by at most one.
struct TokenRange {
  int begin, end;
};

EPCOMM_HOST_DEVICE TokenRange channel_token_range(int num_tokens, int num_channels, int channel) {
  auto const bound = [&](int c) { return int(int64_t(num_tokens) * c / num_channels); };
  return {bound(channel), bound(channel + 1)};
}

}  // namespace epcomm::kernels
