#pragma once
// Where received rows land, from the counts the peers sent (notify, both paths): one layout rule.
//   rows of source s, channel c start at prefix[s][c]; sources in order, each split by channel;
//   prefix[s][C] is the end of source s (= the start of s + 1).

#include <cstdint>

#include "../common/compat.cuh"

namespace epcomm::kernels {

// One thread: fills prefix_matrix [num_sources, num_channels + 1] (and, when not null, source_prefix
// [num_sources + 1]: first row of each source, then the total) from counts_of(s), int32 [num_channels]
// rows of source s per channel. Returns the total.
template <class CountsOf>
EPCOMM_DEVICE int build_channel_prefix(int num_sources, int num_channels, CountsOf const& counts_of,
                                       int32_t* prefix_matrix, int32_t* source_prefix) {
  int row = 0;
  for (int src = 0; src < num_sources; ++src) {
    int32_t const* counts = counts_of(src);
    if (source_prefix != nullptr) source_prefix[src] = row;
    int32_t* prefix = prefix_matrix + int64_t(src) * (num_channels + 1);
    for (int channel = 0; channel < num_channels; ++channel) {
      prefix[channel] = row;
      row += counts[channel];
    }
    prefix[num_channels] = row;
  }
  if (source_prefix != nullptr) source_prefix[num_sources] = row;
  return row;
}

// Every thread of the block: out[e] = the sum over sources of counts_of(s)[e], rounded up to `alignment`.
template <class CountsOf>
EPCOMM_DEVICE void sum_expert_counts(int num_local_experts, int num_sources, int alignment, CountsOf const& counts_of,
                                     int32_t* out) {
  for (int expert = int(threadIdx.x); expert < num_local_experts; expert += int(blockDim.x)) {
    int total = 0;
    for (int src = 0; src < num_sources; ++src) total += counts_of(src)[expert];
    out[expert] = (total + alignment - 1) / alignment * alignment;
  }
}

}  // namespace epcomm::kernels
