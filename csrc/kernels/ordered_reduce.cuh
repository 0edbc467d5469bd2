#pragma once
// The one ordered reduction every combine uses (intranode receiver, internode forwarder and network
// receiver), so that every path and backend sums alike and agrees bit for bit:
//
//   out(i, j) = ((+0.0f + value(s0, row, j)) + value(s1, row, j)) + ...   for i < num_tokens, j < width,
//
// over the sources s = 0, 1, ... (ascending) with rows[i][s] >= 0, in fp32. Every thread of the
// block takes part (elements strided by blockDim.x); the caller synchronizes before and after.

#include "../common/compat.cuh"
#include "config.cuh"

namespace epcomm::kernels {

// load(source, row, element) -> float; store(token, element, float sum).
template <int kMaxSources, class Load, class Store>
EPCOMM_DEVICE void reduce_batch_in_order(int const (&rows)[kMaxCombineBatchTokens][kMaxSources], int num_tokens,
                                         int num_sources, int width, Load const& load, Store const& store) {
  for (int i = 0; i < num_tokens; ++i) {
    for (int j = int(threadIdx.x); j < width; j += int(blockDim.x)) {
      float sum = 0.0f;
      for (int s = 0; s < num_sources; ++s) {
        int const row = rows[i][s];
        if (row >= 0) sum += load(s, row, j);
      }
      store(i, j, sum);
    }
  }
}

}  // namespace epcomm::kernels
