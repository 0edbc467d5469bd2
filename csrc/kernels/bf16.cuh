#pragma once
// bf16 <-> fp32 on raw bits, identical on both targets (no cuda_bf16.h):
// widening is exact; narrowing rounds to nearest even and turns every NaN
// into 0x7fc0, as torch's Tensor.to(torch.bfloat16) does on CPU.

#include <cstdint>
#include <cstring>

#include "../common/compat.cuh"

namespace epcomm::kernels {

EPCOMM_HOST_DEVICE float bf16_bits_to_float(uint16_t bits) {
  uint32_t const wide = uint32_t(bits) << 16;
  float value;
  memcpy(&value, &wide, sizeof(value));
  return value;
}

EPCOMM_HOST_DEVICE uint16_t float_to_bf16_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  uint32_t const rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding_bias) >> 16);
}

}  // namespace epcomm::kernels
