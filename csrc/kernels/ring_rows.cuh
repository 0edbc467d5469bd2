#pragma once
// Row <-> NVL ring slot copies shared by the intranode and internode kernels
// (slot layout: workspace.cuh). All functions are warp-collective; kStyle is the kernel's copy
// (channel.cuh: 16-byte vectors, or 4-byte words in the register-capped internode kernels).

#include "../common/compat.cuh"
#include "channel.cuh"
#include "placement.cuh"
#include "workspace.cuh"

namespace epcomm::kernels {

// Where a receiver stores rows taken out of dispatch slots, and how it localises expert ids.
struct ReceivedRowOutputs {
  void* recv_x;                // [M, hidden_bytes]
  void* recv_x_scales;         // [M, scale_bytes] (scale_bytes > 0)
  int64_t* recv_topk_idx;      // [M, K] or null
  float* recv_topk_weights;    // [M, K] or null
  int32_t* recv_src_idx;       // [M] or null
  int hidden_bytes, scale_bytes, num_topk;
  int rank;                   // the receiving rank: only its experts keep an id (made local)
  int64_t num_local_experts;  // experts per rank (0 without topk_idx)
};

// Copies dispatch slot `slot` out to received row `row`; experts of other ranks become -1 (weight 0).
template <CopyStyle kStyle = CopyStyle::kVectors>
EPCOMM_DEVICE void store_received_row(ReceivedRowOutputs const& out, NvlWorkspace const& ws, char* slot, int64_t row,
                                      int lane) {
  warp_copy<kStyle>(static_cast<int32_t*>(out.recv_x) + row * (out.hidden_bytes / 4),
                    reinterpret_cast<int32_t const*>(slot), out.hidden_bytes / 4, lane);
  if (out.scale_bytes > 0)
    warp_copy<kStyle>(static_cast<int32_t*>(out.recv_x_scales) + row * (out.scale_bytes / 4),
                      reinterpret_cast<int32_t const*>(slot + out.hidden_bytes), out.scale_bytes / 4, lane);
  if (lane == 0 && out.recv_src_idx != nullptr) out.recv_src_idx[row] = *ws.slot_src_idx(slot);
  for (int k = lane; k < out.num_topk; k += 32) {
    int64_t const local = local_expert(ws.slot_topk_idx(slot)[k], out.rank, out.num_local_experts);
    bool const is_local = local >= 0;
    if (out.recv_topk_idx != nullptr) out.recv_topk_idx[row * out.num_topk + k] = local;
    if (out.recv_topk_weights != nullptr)
      out.recv_topk_weights[row * out.num_topk + k] = is_local ? ws.slot_topk_weights(slot)[k] : 0.0f;
  }
}

// Writes combine row `row` of x (`row_bytes` per row, any element type) and, if given, its topk weights into `slot`.
template <CopyStyle kStyle = CopyStyle::kVectors>
EPCOMM_DEVICE void write_combine_slot(NvlWorkspace const& ws, char* slot, void const* x, float const* topk_weights,
                                      int64_t row, int row_bytes, int num_topk, int lane) {
  int const row_words = row_bytes / 4;
  warp_copy<kStyle>(reinterpret_cast<int32_t*>(slot), static_cast<int32_t const*>(x) + row * row_words, row_words, lane);
  if (topk_weights != nullptr)
    for (int k = lane; k < num_topk; k += 32) ws.slot_topk_weights(slot)[k] = topk_weights[row * num_topk + k];
}

}  // namespace epcomm::kernels
