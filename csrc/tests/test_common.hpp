#pragma once
// Host-side pieces shared by the kernel tests: bf16 reference conversions (written
// from torch's definition, not from the kernels), aligned zeroed buffers, the
// kernel timeout the tests use, the text of an ErrorSlot, random expert outputs and the
// combined-element check.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../kernels/call_check.cuh"
#include "../kernels/error.cuh"
#include "../kernels/workspace.cuh"
#include "harness.hpp"

namespace epcomm::test {

inline float ref_bf16_to_float(uint16_t bits) {
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

// Round to nearest, ties to even, every NaN -> 0x7fc0 (torch's float -> bfloat16).
inline uint16_t ref_float_to_bf16(float value) {
  if (std::isnan(value)) return 0x7fc0;
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  uint32_t upper = bits >> 16, lower = bits & 0xffffu;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++upper;
  return uint16_t(upper);
}

struct AlignedBuffer {
  void* ptr = nullptr;
  explicit AlignedBuffer(size_t bytes) {
    ptr = std::aligned_alloc(128, kernels::align_up(bytes, 128));
    std::memset(ptr, 0, kernels::align_up(bytes, 128));
  }
  ~AlignedBuffer() { std::free(ptr); }
  AlignedBuffer(AlignedBuffer const&) = delete;
  AlignedBuffer& operator=(AlignedBuffer const&) = delete;
};

// One expert output row: random bf16 values (exact: 8 significant bits) with exponents far apart, so
// that summing in another order changes the rounded result; one row in eight is all -0.0, so that a
// sum that does not start at +0.0 shows.
inline void fill_random_expert_row(std::mt19937_64& rng, uint16_t* row, int hidden) {
  bool const negative_zero_row = rng() % 8 == 0;
  for (int j = 0; j < hidden; ++j) {
    float const magnitude = std::ldexp(1.0f + float(rng() % 128) / 128.0f, int(rng() % 48) - 24);
    float const value = negative_zero_row ? -0.0f : (rng() % 2 ? magnitude : -magnitude);
    row[j] = ref_float_to_bf16(value);
  }
}

// A combined bf16 element against its reference value; the message says where they differ.
inline void check_combined_element(uint16_t got, uint16_t want, int rank, int token, int element) {
  if (want != got)
    throw CheckFailure("combine mismatch: rank " + std::to_string(rank) + " token " + std::to_string(token) +
                       " element " + std::to_string(element) + ": " + std::to_string(got) + " != " +
                       std::to_string(want));
}

inline long long kernel_timeout_cycles() {
  char const* ms = std::getenv("EPCOMM_TEST_KERNEL_TIMEOUT_MS");
  return (ms ? std::atoll(ms) : 30'000) * 1'000'000LL;  // clock64 is in ns on the CPU target
}

inline std::string error_text(kernels::ErrorSlot const& slot) {
  char text[256];
  return kernels::describe_error(slot, text, sizeof(text));
}

// The call check's scenario (kernels/call_check.cuh), for either notify kernel. `run_notify(flags, digests)`
// runs one notify on every rank with those call fields and returns each rank's call_agreed (-1: not written).
// Every rank must reach the same verdict: 1 only when every rank sent the same digest, no flags, this epoch.
template <class RunNotify>
void check_call_verdicts(int num_ranks, RunNotify run_notify) {
  using kernels::kCallNeedsLayout, kernels::kCallRefused, kernels::kNoCallCheck;
  std::vector<int> const plain(size_t(num_ranks), 0);
  std::vector<int64_t> const same(size_t(num_ranks), 0x5eed'0000'0000'0007LL);
  auto const everywhere = [&](int32_t verdict) { return std::vector<int32_t>(size_t(num_ranks), verdict); };
  auto with = [](auto values, int rank, auto value) {
    values[size_t(rank)] = value;
    return values;
  };
  int const last = num_ranks - 1;
  CHECK(run_notify(plain, same) == everywhere(1));
  CHECK(run_notify(plain, with(same, last, int64_t(8))) == everywhere(0));  // one rank runs another call
  CHECK(run_notify(with(plain, 0, kCallRefused), same) == everywhere(0));   // one rank refused its inputs
  CHECK(run_notify(with(plain, last, kCallNeedsLayout), same) == everywhere(0));
  CHECK(run_notify(plain, same) == everywhere(1));
  // One rank sends no header: its slots still hold its header of two notifies ago (same parity,
  // same digest, no flags); only the epoch in the tag tells it is stale
  std::vector<int32_t> const stale = run_notify(with(plain, 0, kNoCallCheck), same);
  CHECK(stale == with(everywhere(0), 0, int32_t(-1)));
  CHECK(run_notify(plain, same) == everywhere(1));
}

}  // namespace epcomm::test
