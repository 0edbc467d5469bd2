#pragma once
// The call check: the ranks learn inside a notify's barrier, which they run anyway, whether they
// are all about to run the same call, so calls whose sizes are already known (cached dispatch,
// combine) need no host collective.
//
//   CallHeader {digest, tag}: digest = the host's hash of the call's signature (operation, handle,
//   sizes, dtypes, config); tag = epoch << 8 | flags, flags = kCallRefused (this rank's own checks
//   failed) | kCallNeedsLayout (this call needs other buffers than the ones the notify runs in).
//
// A source writes its header into every destination's slot [epoch parity][source] before its barrier
// signal (release); after the barrier (acquire) every rank compares all slots with its own digest and
// flags 0 at this epoch. The verdict is the same on every rank: if some rank differs, each rank sees a
// header that differs from its own or has flags. On "no" the host runs its agreement collective, which
// names the ranks and the fields (epcomm/_agree.py). The tag makes a stale header (the other parity's)
// never pass for this call.
//
// The verdict on the device (calls made without a host wait, epcomm.host_sync_free): the notify also writes
// which rank differed first and how (call_mismatch), and the data kernel that follows it in stream order
// takes call_agreed as its call_verdict: on "no" every thread returns at once and the rank reports
// kCallRejected, raising no abort flag. Every rank read the same headers, so every rank's data kernel stops
// there, nothing moves and nobody waits: the buffers stay as the notify left them, usable by the next call.

#include <cstdint>

#include "../common/compat.cuh"
#include "error.cuh"

namespace epcomm::kernels {

struct CallHeader {
  int64_t digest;
  int64_t tag;
};
static_assert(sizeof(CallHeader) == 16, "a call header is one 16-byte put");
inline constexpr int kCallHeaderInts = int(sizeof(CallHeader) / sizeof(int32_t));

inline constexpr int kCallRefused = 1;      // the rank refused its inputs
inline constexpr int kCallNeedsLayout = 2;  // the call does not fit the buffers' current layout
inline constexpr int kNoCallCheck = -1;     // call_flags value: the notify carries no header

EPCOMM_HOST_DEVICE CallHeader make_call_header(int64_t digest, int flags, int64_t epoch) {
  return {digest, (epoch << 8) | int64_t(flags & 0xff)};
}

// Whether `seen` is the header of a rank that runs the call `digest` at `epoch` and accepts it.
EPCOMM_HOST_DEVICE bool call_header_agrees(CallHeader const& seen, int64_t digest, int64_t epoch) {
  CallHeader const agreed = make_call_header(digest, 0, epoch);
  return seen.digest == agreed.digest && seen.tag == agreed.tag;
}

inline constexpr int kCallDiffers = 256;  // in a mismatch's flags: that rank's call (its digest) differs

// The verdict of one rank from every source's header (header_of(source) -> CallHeader const*): agreed[0] = 1
// when all agree, else 0; with `mismatch` ([2] or null): the first source whose header differs (-1: none) and
// its flags, + kCallDiffers when it runs another call (digest), -1 when its header is not this epoch's.
template <class HeaderOf>
EPCOMM_DEVICE void judge_call(int num_ranks, int64_t digest, int64_t epoch, HeaderOf header_of, int32_t* agreed,
                              int32_t* mismatch) {
  int32_t first = -1, flags = -1;
  for (int source = 0; source < num_ranks && first < 0; ++source) {
    CallHeader const seen = *header_of(source);
    if (call_header_agrees(seen, digest, epoch)) continue;
    first = source;
    if ((seen.tag >> 8) == epoch) flags = int32_t(seen.tag & 0xff) + (seen.digest != digest ? kCallDiffers : 0);
  }
  *agreed = first < 0 ? 1 : 0;
  if (mismatch != nullptr) {
    mismatch[0] = first;
    mismatch[1] = flags;
  }
}

// A data kernel's gate: whether the notify before it rejected its call (call_verdict: that notify's
// call_agreed, then its call_mismatch; null: no gate). Every thread reads it (the notify ended before this
// kernel began, in stream order).
EPCOMM_DEVICE bool call_rejected(int32_t const* verdict) { return verdict != nullptr && verdict[0] != 1; }

// Block 0's thread 0 reports the rejection (`context`: the kernel's, any role); the other threads only return.
EPCOMM_DEVICE void report_call_rejected(WaitContext context, int32_t const* verdict) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  context.role = Role::kCallGate;
  context.channel = -1;
  context.peer = verdict[1];
  report_failure(context, ErrorCode::kCallRejected, 0, verdict[2]);
}

// The call-check fields of a notify's Args (host-side validation, both paths).
template <class Args>
char const* validate_call_check(Args const& args) {
  int const flags = args.call_flags;
  if (flags == kNoCallCheck) return nullptr;
  if (flags < 0 || flags > (kCallRefused | kCallNeedsLayout))
    return "notify: call_flags must be -1 (no call check) or kCallRefused | kCallNeedsLayout bits";
  if (args.call_agreed == nullptr) return "notify: a call check (call_flags >= 0) needs call_agreed";
  return nullptr;
}

}  // namespace epcomm::kernels
