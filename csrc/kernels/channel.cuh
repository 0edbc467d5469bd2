#pragma once
// Warp-level pieces of a ring channel shared by dispatch and combine.
// A ring (channel, source) lives in the receiver's NVL buffer (NvlWorkspace):
//   sender:    wait head >= sent + chunk - ring (acquire) -> write rows -> tail = sent (release, every chunk)
//   receiver:  wait tail >= needed (acquire) -> read rows -> head = consumed (release)
// Head and tail count rows since the last notify, which resets them to 0.
//
// Planted bug (build flag) that the checks must catch:
//   EPCOMM_PLANT_RING_RELAXED_TAIL  senders publish the tail with a relaxed store (TSAN reports a race)
//   EPCOMM_PLANT_FORWARDER_RELAXED_TAIL  only rings with planted_relaxed_tail set (the internode
//                                   forwarder's NVL rings) publish relaxed

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "elements.cuh"
#include "intranode.hpp"

namespace epcomm::kernels {

inline constexpr uint32_t kFullWarpMask = 0xffffffffu;

EPCOMM_HOST_DEVICE bool is_16_byte_aligned(void const* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
EPCOMM_HOST_DEVICE bool both_16_byte_aligned(void const* a, void const* b) {
  return is_16_byte_aligned(a) && is_16_byte_aligned(b);
}

// One warp copies `num_vectors` 16-byte vectors (both ends 16-byte aligned).
EPCOMM_DEVICE void warp_copy_vectors(void* dst, void const* src, int num_vectors, int lane) {
  Vec16* out = static_cast<Vec16*>(dst);
  Vec16 const* in = static_cast<Vec16 const*>(src);
  for (int i = lane; i < num_vectors; i += 32) out[i] = in[i];
}

// One warp copies `num_words` 4-byte words: as 16-byte vectors when both ends are 16-byte aligned (a
// lane moves 16 bytes per load and per store: a quarter of the instructions), the words after the last
// whole vector, or all of them when an end is only 4-byte aligned, one by one. Every lane takes the same
// path (same pointers). Ring slots are 16-byte aligned with the row first (workspace.cuh,
// rdma_workspace.cuh), so rows of a multiple of 16 bytes in aligned tensors take the vector path.
EPCOMM_DEVICE void warp_copy_words(int32_t* dst, int32_t const* src, int num_words, int lane) {
  if (both_16_byte_aligned(dst, src)) {
    int const num_vectors = num_words / 4;
    warp_copy_vectors(dst, src, num_vectors, lane);
    dst += 4 * num_vectors;
    src += 4 * num_vectors;
    num_words -= 4 * num_vectors;
  }
  for (int i = lane; i < num_words; i += 32) dst[i] = src[i];
}

// 4-byte words only, the loop not unrolled: for kernels at the 64-register cap of 1024-thread blocks
// (internode dispatch and combine), where the vector path's and unrolled loops' registers spill
// (measured, sm_90: 52 bytes of spills in internode dispatch, 4 in internode combine).
EPCOMM_DEVICE void warp_copy_words_rolled(int32_t* dst, int32_t const* src, int num_words, int lane) {
#if EPCOMM_TARGET_CUDA
#pragma unroll 1
#endif
  for (int i = lane; i < num_words; i += 32) dst[i] = src[i];
}

// Which of the two copies a shared row helper (ring_rows.cuh) uses: the kernel's choice.
enum class CopyStyle { kVectors, kWordsRolled };

template <CopyStyle kStyle>
EPCOMM_DEVICE void warp_copy(int32_t* dst, int32_t const* src, int num_words, int lane) {
  if constexpr (kStyle == CopyStyle::kVectors)
    warp_copy_words(dst, src, num_words, lane);
  else
    warp_copy_words_rolled(dst, src, num_words, lane);
}

EPCOMM_DEVICE WaitContext comm_wait_context(CommArgs const& comm, KernelId kernel, Role role, int channel,
                                            int peer) {
  return WaitContext{comm.error, comm.peer_buffers, comm.workspace.abort_flag_offset, comm.num_ranks, comm.rank,
                     kernel,     role,              channel,                          peer,           comm.timeout_cycles};
}

// Lane 0 waits for `*counter >= expected`; every lane gets the outcome and the value seen.
// The trailing syncwarp orders lane 0's acquire before the whole warp's next accesses.
EPCOMM_DEVICE bool warp_wait_at_least(WaitContext const& context, int32_t const* counter, int64_t expected,
                                      int lane, int* observed) {
  int64_t value = 0;
  int ok = 1;
  if (lane == 0)
    ok = wait_at_least(context, expected, [&] { return ptx::ld_acquire_sys_global(counter); }, &value) ? 1 : 0;
  ok = ptx::shfl_sync(kFullWarpMask, ok, 0);
  *observed = ptx::shfl_sync(kFullWarpMask, int(value), 0);
  ptx::syncwarp();
  return ok != 0;
}

// The sending warp's side of one ring. All members are warp-uniform.
struct RingSender {
  int32_t const* head;  // in the receiver's buffer
  int32_t* tail;        // in the receiver's buffer
  int ring_tokens, chunk_tokens;
  int sent = 0, published = 0, slot_limit = 0;  // rows [0, slot_limit) may be written
#if defined(EPCOMM_PLANT_FORWARDER_RELAXED_TAIL)
  bool planted_relaxed_tail = false;
#endif

  EPCOMM_DEVICE RingSender(int32_t const* head_, int32_t* tail_, KernelConfig const& config)
      : head(head_), tail(tail_), ring_tokens(config.nvl_ring_tokens), chunk_tokens(config.nvl_chunk_send_tokens),
        slot_limit(config.nvl_ring_tokens) {}

  // Lane 0 publishes the rows written so far (after the warp's writes, ordered by the syncwarp).
  EPCOMM_DEVICE void publish(int lane) {
    if (published == sent) return;
    ptx::syncwarp();
    if (lane == 0) {
#if defined(EPCOMM_PLANT_RING_RELAXED_TAIL)
      ptx::st_relaxed_sys_global(tail, int32_t(sent));
#elif defined(EPCOMM_PLANT_FORWARDER_RELAXED_TAIL)
      if (planted_relaxed_tail)
        ptx::st_relaxed_sys_global(tail, int32_t(sent));
      else
        ptx::st_release_sys_global(tail, int32_t(sent));
#else
      ptx::st_release_sys_global(tail, int32_t(sent));
#endif
    }
    published = sent;
  }

  // Makes sure row `sent` has a free slot; false when the wait failed (reported).
  EPCOMM_DEVICE bool reserve(WaitContext const& context, int lane) {
    if (sent < slot_limit) return true;
    // Publish what is written so the receiver can free it, then wait for a chunk of free slots
    publish(lane);
    int head_value = 0;
    if (!warp_wait_at_least(context, head, int64_t(sent) + chunk_tokens - ring_tokens, lane, &head_value))
      return false;
    slot_limit = head_value + ring_tokens;
    return true;
  }

  // After the warp wrote row `sent`: move the tail every chunk.
  EPCOMM_DEVICE void commit(int lane) {
    ++sent;
    if (sent - published >= chunk_tokens) publish(lane);
  }
};

}  // namespace epcomm::kernels
