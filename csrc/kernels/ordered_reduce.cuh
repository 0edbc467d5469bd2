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
#include "elements.cuh"

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

// The same sums, each thread taking kVector consecutive elements per step: load_vector(source, row,
// element, float (&)[kVector]) reads elements [element, element + kVector) with one 16-byte load, and
// store_vector(token, element, float const (&)[kVector]) writes them with one store. Every element is
// summed in the order above, so both variants give the same bits. width % kVector == 0.
template <int kVector, int kMaxSources, class LoadVector, class StoreVector>
EPCOMM_DEVICE void reduce_batch_in_order_vectors(int const (&rows)[kMaxCombineBatchTokens][kMaxSources],
                                                 int num_tokens, int num_sources, int width,
                                                 LoadVector const& load_vector, StoreVector const& store_vector) {
  for (int i = 0; i < num_tokens; ++i) {
    for (int j = int(threadIdx.x) * kVector; j < width; j += int(blockDim.x) * kVector) {
      float sum[kVector] = {};
      for (int s = 0; s < num_sources; ++s) {
        int const row = rows[i][s];
        if (row < 0) continue;
        float values[kVector];
        load_vector(s, row, j, values);
        for (int e = 0; e < kVector; ++e) sum[e] += values[e];
      }
      store_vector(i, j, sum);
    }
  }
}

}  // namespace epcomm::kernels
