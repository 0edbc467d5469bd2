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

#include <cstdint>

#include "../common/compat.cuh"

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

// The verdict of one rank: every source's header (header_of(source) -> CallHeader const*) agrees.
template <class HeaderOf>
EPCOMM_DEVICE bool all_call_headers_agree(int num_ranks, int64_t digest, int64_t epoch, HeaderOf header_of) {
  bool agreed = true;
  for (int source = 0; source < num_ranks; ++source) agreed = agreed && call_header_agrees(*header_of(source), digest, epoch);
  return agreed;
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
