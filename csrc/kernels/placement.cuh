#pragma once
// Expert placement on the device: the kernels' copy of epcomm/placement.py's uniform rule.
// With L = num_experts / num_ranks experts per rank, expert e lives on rank e / L as local
// expert e % L; rank r hosts the global experts [r * L, (r + 1) * L). Expert ids follow
// topk_idx's convention: -1 (any negative) is "no expert".
//
// The kernels compute the rule from L rather than reading ExpertPlacement.rank_table();
// a non-uniform placement (redundant experts) would replace these helpers with table look-ups.

#include <cstdint>

#include "../common/compat.cuh"

namespace epcomm::kernels {

// L: experts per rank. The caller has checked num_experts % num_ranks == 0 (Python does, before launch).
EPCOMM_HOST_DEVICE int uniform_num_local_experts(int num_experts, int num_ranks) { return num_experts / num_ranks; }

// The rank hosting `expert`, or -1 for "no expert". 32-bit on purpose: layout runs it per (token, slot, rank),
// and a 64-bit division would call a slow division routine on the GPU.
EPCOMM_HOST_DEVICE int expert_rank(int expert, int num_local_experts) {
  return expert >= 0 ? expert / num_local_experts : -1;
}

// The global id of `rank`'s first expert (its local expert 0).
EPCOMM_HOST_DEVICE int64_t first_local_expert(int rank, int64_t num_local_experts) {
  return num_local_experts * rank;
}

// `rank`'s local id of global `expert`, or -1 when the expert is on another rank (or is -1).
EPCOMM_HOST_DEVICE int64_t local_expert(int64_t expert, int rank, int64_t num_local_experts) {
  int64_t const local = expert - first_local_expert(rank, num_local_experts);
  return local >= 0 && local < num_local_experts ? local : -1;
}

}  // namespace epcomm::kernels
