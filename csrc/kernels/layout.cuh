#pragma once
// get_dispatch_layout: from topk_idx [N, K] (-1 = none) compute
// num_tokens_per_expert [E], num_tokens_per_rank [R] and is_token_in_rank [N, R].
// Blocks [0, expert blocks) each count kLayoutThreads experts; the remaining
// blocks each own kLayoutThreads ranks (and their is_token_in_rank columns).

#include "../common/compat.cuh"
#include "intranode.hpp"
#include "placement.cuh"

namespace epcomm::kernels {

EPCOMM_DEVICE void count_experts(LayoutArgs const& args, int first_expert, int* counts) {
  int const end_expert = min_int(args.num_experts, first_expert + kLayoutThreads);
  counts[threadIdx.x] = 0;
  __syncthreads();
  // Count each token's experts that fall in this block's range
  for (int t = int(threadIdx.x); t < args.num_tokens; t += int(blockDim.x)) {
    for (int k = 0; k < args.num_topk; ++k) {
      int64_t const expert = args.topk_idx[int64_t(t) * args.num_topk + k];
      if (expert >= first_expert && expert < end_expert) atomicAdd(&counts[expert - first_expert], 1);
    }
  }
  __syncthreads();
  if (first_expert + int(threadIdx.x) < end_expert) args.num_tokens_per_expert[first_expert + threadIdx.x] = counts[threadIdx.x];
}

EPCOMM_DEVICE void count_ranks(LayoutArgs const& args, int first_rank, int* counts) {
  int const end_rank = min_int(args.num_ranks, first_rank + kLayoutThreads);
  int const num_local_experts = uniform_num_local_experts(args.num_experts, args.num_ranks);
  counts[threadIdx.x] = 0;
  __syncthreads();
  for (int t = int(threadIdx.x); t < args.num_tokens; t += int(blockDim.x)) {
    int64_t const* token_experts = args.topk_idx + int64_t(t) * args.num_topk;
    for (int r = first_rank; r < end_rank; ++r) {
      bool in_rank = false;
      for (int k = 0; k < args.num_topk; ++k) {
        int const expert = int(token_experts[k]);  // 32-bit division: no call into a 64-bit division routine
        in_rank = in_rank || expert_rank(expert, num_local_experts) == r;  // -1 ("no expert") is no rank
      }
      args.is_token_in_rank[int64_t(t) * args.num_ranks + r] = in_rank;
      if (in_rank) atomicAdd(&counts[r - first_rank], 1);
    }
  }
  __syncthreads();
  if (first_rank + int(threadIdx.x) < end_rank) args.num_tokens_per_rank[first_rank + threadIdx.x] = counts[threadIdx.x];
}

EPCOMM_GLOBAL void EPCOMM_LAUNCH_BOUNDS(kLayoutThreads) get_dispatch_layout_kernel(LayoutArgs args) {
  __shared__ int counts[kLayoutThreads];
  int const num_expert_blocks = (args.num_experts + kLayoutThreads - 1) / kLayoutThreads;
  if (int(blockIdx.x) < num_expert_blocks) {
    count_experts(args, int(blockIdx.x) * kLayoutThreads, counts);
  } else {
    count_ranks(args, (int(blockIdx.x) - num_expert_blocks) * kLayoutThreads, counts);
  }
}

}  // namespace epcomm::kernels
