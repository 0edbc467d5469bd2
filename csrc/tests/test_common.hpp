#pragma once
// Host-side pieces shared by the kernel tests: bf16 reference conversions (written
// from torch's definition, not from the kernels), aligned zeroed buffers, the
// kernel timeout the tests use, and the text of an ErrorSlot.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../kernels/error.cuh"
#include "../kernels/workspace.cuh"

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

inline long long kernel_timeout_cycles() {
  char const* ms = std::getenv("EPCOMM_TEST_KERNEL_TIMEOUT_MS");
  return (ms ? std::atoll(ms) : 30'000) * 1'000'000LL;  // clock64 is in ns on the CPU target
}

inline std::string error_text(kernels::ErrorSlot const& slot) {
  char text[256];
  return kernels::describe_error(slot, text, sizeof(text));
}

}  // namespace epcomm::test
