#pragma once
// Device pieces shared by the low-latency kernels (low_latency.hpp): error reports that travel as the
// transport's abort signal, the one wait every receive kernel uses, warp reductions and the FP8 block
// scale (16-byte copies: channel.cuh).

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "channel.cuh"
#include "elements.cuh"
#include "low_latency.hpp"

namespace epcomm::kernels {

// Who is waiting, for the ErrorSlot. No peer buffers: report_failure only fills the slot; the alarm
// travels as the transport's abort signal (ll_raise_abort), which every LL wait polls.
template <class Transport>
EPCOMM_DEVICE WaitContext ll_context(LowLatencyComm<Transport> const& comm, KernelId kernel, Role role, int channel,
                                     int peer) {
  return WaitContext{comm.error, nullptr, 0, 0, comm.rank, kernel, role, channel, peer, comm.timeout_cycles};
}

// This rank's generation word of `slot`'s dispatches (or combines): LowLatencyLayout::generation.
template <class Transport>
EPCOMM_DEVICE uint64_t* ll_generation(LowLatencyComm<Transport> const& comm, int slot, bool combine) {
  return reinterpret_cast<uint64_t*>(comm.transport.local_buffer() + comm.layout.generation(slot, combine));
}

// A send kernel counts its call: one thread adds one to the slot's generation (plain: no other kernel of
// the call touches it until the receive kernel, a later launch in this rank's stream).
template <class Transport>
EPCOMM_DEVICE void ll_count_call(LowLatencyComm<Transport> const& comm, int slot, bool combine) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *ll_generation(comm, slot, combine) += 1;
}

// What a receive kernel waits for on each signal of its call: generation units (a receive with no send
// since the last clean waits as the first call would).
template <class Transport>
EPCOMM_DEVICE uint64_t ll_expected(LowLatencyComm<Transport> const& comm, int slot, bool combine) {
  uint64_t const generation = *ll_generation(comm, slot, combine);
  return (generation > 0 ? generation : 1) * comm.layout.signal_unit();
}

// Warp-collective: the abort signal of every rank += 1 (this rank's too: it ends its other waits).
template <class Transport>
EPCOMM_DEVICE void ll_raise_abort(LowLatencyComm<Transport> const& comm, int lane) {
  for (int peer = 0; peer < comm.num_ranks; ++peer)
    comm.transport.signal_add(WarpCoop{lane}, peer, comm.layout.abort_signal(), 1);
}

// Warp-collective: lane 0 reports (the rank's first failure fills the slot), then every rank is told.
template <class Transport>
EPCOMM_DEVICE void ll_fail(LowLatencyComm<Transport> const& comm, WaitContext const& context, ErrorCode code,
                           int64_t expected, int64_t observed, int lane) {
  if (lane == 0) report_failure(context, code, expected, observed);
  ll_raise_abort(comm, lane);
}

enum class LowLatencyWait { kReached = 0, kTimeout = 1, kAborted = 2 };

// The spin every LL wait shares (one thread): polls this rank's `signal` (acquire) until it is >= expected,
// checking the abort signal and the clock every 16 polls. `observed`: the last value read.
template <class Transport>
EPCOMM_DEVICE LowLatencyWait ll_spin_until(LowLatencyComm<Transport> const& comm, int signal, uint64_t expected,
                                           long long start, uint64_t* observed) {
  Transport const& transport = comm.transport;
  *observed = transport.read_signal(signal);
  for (int spins = 0; *observed < expected; ++spins) {
    if ((spins & 15) == 15) {
      if (transport.read_signal(comm.layout.abort_signal()) != 0) return LowLatencyWait::kAborted;
      if (ptx::read_clock64() - start > comm.timeout_cycles) return LowLatencyWait::kTimeout;
    }
    *observed = transport.read_signal(signal);
  }
  return LowLatencyWait::kReached;
}

// Warp-collective: every lane with a signal (>= 0) waits, in parallel, for this rank's signal
// >= expected (ll_spin_until). `context` is the lane's own (its peer and channel). On a failure the lowest
// failing lane's wait is reported; after a timeout every rank's abort signal is raised, after an abort
// (kPeerAborted) nothing more. The trailing syncwarp orders every lane's acquire before the whole warp's
// reads. `waited` (may be null): the clock64 ticks lane 0 spent in here.
template <class Transport>
EPCOMM_DEVICE bool ll_warp_wait(LowLatencyComm<Transport> const& comm, WaitContext const& context, int signal,
                                uint64_t expected, int lane, long long* waited) {
  long long const start = ptx::read_clock64();
  uint64_t observed = expected;
  int outcome = signal >= 0 ? int(ll_spin_until(comm, signal, expected, start, &observed)) : int(LowLatencyWait::kReached);
  long long const ticks = ptx::read_clock64() - start;
  if (waited != nullptr) *waited = ptx::shfl_sync(kFullWarpMask, ticks, 0);
  uint32_t const failed = ptx::ballot_sync(kFullWarpMask, outcome != 0);
  if (failed == 0) {
    ptx::syncwarp();
    return true;
  }
  int const leader = __ffs(int(failed)) - 1;
  outcome = ptx::shfl_sync(kFullWarpMask, outcome, leader);
  if (lane == leader)
    report_failure(context, outcome == int(LowLatencyWait::kTimeout) ? ErrorCode::kTimeout : ErrorCode::kPeerAborted, int64_t(expected),
                   int64_t(observed));
  ptx::syncwarp();
  if (outcome == int(LowLatencyWait::kTimeout)) ll_raise_abort(comm, lane);
  return false;
}

EPCOMM_DEVICE int ll_warp_sum(int value, int lane) {
  for (int offset = 16; offset > 0; offset >>= 1) value += ptx::shfl_sync(kFullWarpMask, value, lane ^ offset);
  return value;
}

// The warp's max; NaN if any lane's value is NaN.
EPCOMM_DEVICE float ll_warp_max(float value, int lane) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float const other = ptx::shfl_sync(kFullWarpMask, value, lane ^ offset);
    value = other > value || other != other ? other : value;
  }
  return value;
}

// max(|a|, |b|); NaN if either is NaN (a block holding a NaN gets a NaN scale: all its values NaN).
EPCOMM_HOST_DEVICE float ll_max_magnitude(float a, float b) {
  float const x = bits_to_float(float_to_bits(a) & 0x7fffffffu), y = bits_to_float(float_to_bits(b) & 0x7fffffffu);
  return y > x || y != y ? y : x;
}

// The FP8 scale of a 1 x 128 block with max |x| = amax, as epcomm/fp8.py's per_token_cast_to_fp8 (what
// the torch backend uses, so both agree bit for bit): max(amax, 1e-4) / 448 (an all-zero block gets the
// harmless 1e-4 / 448), with round_scale the smallest power of two >= that (exact, from the exponent
// bits; every such scale is a normal float, 2^-22 .. 2^120, so UE8M0 holds it). A NaN amax stays NaN.
EPCOMM_HOST_DEVICE float ll_block_scale(float amax, bool round_scale) {
  float const clamped = amax < kLowLatencyAmaxEps ? kLowLatencyAmaxEps : amax;  // NaN stays NaN
  float const scale = clamped / 448.0f;
  if (!round_scale) return scale;
  uint32_t const bits = float_to_bits(scale);
  uint32_t const exponent = (bits >> 23) & 0xffu, mantissa = bits & 0x7fffffu;
  if (exponent == 0xffu) return scale;  // not finite
  return bits_to_float((exponent + (mantissa != 0 ? 1u : 0u)) << 23);
}

// UE8M0 byte of a power-of-two scale: its biased exponent (exponent + 127).
EPCOMM_HOST_DEVICE uint32_t ll_ue8m0_byte(float power_of_two) { return (float_to_bits(power_of_two) >> 23) & 0xffu; }

}  // namespace epcomm::kernels
