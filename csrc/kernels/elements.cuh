#pragma once
// The element types combine sums, on raw bits, identical on both targets (no
// cuda_bf16.h / cuda_fp16.h): widening to fp32 is exact; narrowing rounds to
// nearest even, as torch's Tensor.to() does on CPU (bf16 NaN -> 0x7fc0,
// fp16 NaN -> 0x7e00, fp16 overflow -> inf).

#include <cstdint>
#include <cstring>

#include "../common/compat.cuh"

namespace epcomm::kernels {

// Values match the Python side's codes (epcomm/backends/sim_backend.py).
enum class ElementKind : int32_t { kBfloat16 = 1, kFloat16 = 2, kFloat32 = 3 };

EPCOMM_HOST_DEVICE int element_bytes(ElementKind kind) { return kind == ElementKind::kFloat32 ? 4 : 2; }
EPCOMM_HOST_DEVICE bool is_element_kind(int32_t code) { return code >= 1 && code <= 3; }

EPCOMM_HOST_DEVICE float bits_to_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

EPCOMM_HOST_DEVICE uint32_t float_to_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

EPCOMM_HOST_DEVICE float bf16_bits_to_float(uint16_t bits) { return bits_to_float(uint32_t(bits) << 16); }

EPCOMM_HOST_DEVICE uint16_t float_to_bf16_bits(float value) {
  uint32_t const bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  uint32_t const rounding_bias = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding_bias) >> 16);
}

EPCOMM_HOST_DEVICE float fp16_bits_to_float(uint16_t half) {
  uint32_t const sign = uint32_t(half & 0x8000u) << 16;
  uint32_t const exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) return bits_to_float(sign | float_to_bits(float(mantissa) * 0x1p-24f));  // zero, subnormal
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

EPCOMM_HOST_DEVICE uint16_t float_to_fp16_bits(float value) {
  uint32_t const bits = float_to_bits(value);
  uint16_t const sign = uint16_t((bits >> 16) & 0x8000u);
  uint32_t const magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;    // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;   // >= 65520 rounds to inf
  if (magnitude < 0x38800000u) {                         // below 2^-14: subnormal half
    // 0.5f has an ulp of 2^-24, the subnormal step: the float add rounds to nearest even for us
    return sign | uint16_t(float_to_bits(bits_to_float(magnitude) + 0.5f) - 0x3f000000u);
  }
  uint32_t const rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return sign | uint16_t((rounded - 0x38000000u) >> 13);  // rebias 127 -> 15
}

// fp32 -> e4m3 (OCP E4M3FN: bias 7, no infinities, 0x7f NaN): round to nearest even, saturating at
// +-448 (inf too); NaN -> 0x7f with the sign. Plain bit arithmetic: the same bits on both targets.
EPCOMM_HOST_DEVICE uint8_t float_to_e4m3_bits(float value) {
  uint32_t const bits = float_to_bits(value);
  uint8_t const sign = uint8_t((bits >> 24) & 0x80u);
  uint32_t const magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint8_t(sign | 0x7fu);  // NaN
  if (magnitude >= 0x43e00000u) return uint8_t(sign | 0x7eu);  // >= 448: saturate
  if (magnitude < 0x3c800000u) {                               // below 2^-6: subnormal e4m3
    // 16384.0f has an ulp of 2^-9, the subnormal step: the float add rounds to nearest even for us
    return uint8_t(sign | (float_to_bits(bits_to_float(magnitude) + 16384.0f) - 0x46800000u));
  }
  uint32_t const rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);
  uint32_t const code = (rounded - (120u << 23)) >> 20;  // rebias 127 -> 7, keep 3 mantissa bits
  return uint8_t(sign | (code > 0x7eu ? 0x7eu : code));
}

// a * b and a + b rounded once each, never contracted into an fma (nvcc contracts by default):
// sums that must match a host reference bit for bit use these.
EPCOMM_DEVICE float mul_rn(float a, float b) {
#if EPCOMM_TARGET_CUDA
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

EPCOMM_DEVICE float add_rn(float a, float b) {
#if EPCOMM_TARGET_CUDA
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// 16 bytes moved as one vector: a single 128-bit load or store on the GPU (LDG.E.128 / STG.E.128).
struct alignas(16) Vec16 {
  uint32_t word[4];
};

// Elements of `kKind` in one Vec16: 8 (bf16, fp16) or 4 (fp32).
template <ElementKind kKind>
inline constexpr int kElementsPerVector = kKind == ElementKind::kFloat32 ? 4 : 8;

// The kElementsPerVector<kKind> elements of `v`, widened to fp32 (the first element in the lowest bytes).
// By value: the caller's dereference of a Vec16 pointer is then one 128-bit load, not four 32-bit ones.
template <ElementKind kKind>
EPCOMM_HOST_DEVICE void widen_vector(Vec16 const v, float (&out)[kElementsPerVector<kKind>]) {
  for (int i = 0; i < kElementsPerVector<kKind>; ++i) {
    if constexpr (kKind == ElementKind::kFloat32) {
      out[i] = bits_to_float(v.word[i]);
    } else {
      uint16_t const half = uint16_t(v.word[i / 2] >> (16 * (i % 2)));
      out[i] = kKind == ElementKind::kBfloat16 ? bf16_bits_to_float(half) : fp16_bits_to_float(half);
    }
  }
}

// `in`, each value rounded to `kKind`, as one Vec16.
template <ElementKind kKind>
EPCOMM_HOST_DEVICE Vec16 narrow_vector(float const (&in)[kElementsPerVector<kKind>]) {
  Vec16 v;
  for (int i = 0; i < 4; ++i) {
    if constexpr (kKind == ElementKind::kFloat32) {
      v.word[i] = float_to_bits(in[i]);
    } else {
      auto const narrow = [](float value) -> uint32_t {
        return kKind == ElementKind::kBfloat16 ? float_to_bf16_bits(value) : float_to_fp16_bits(value);
      };
      v.word[i] = narrow(in[2 * i]) | narrow(in[2 * i + 1]) << 16;
    }
  }
  return v;
}

// Element `index` of a row of `kind`, widened to fp32.
EPCOMM_HOST_DEVICE float load_element(void const* row, int64_t index, ElementKind kind) {
  switch (kind) {
    case ElementKind::kBfloat16: return bf16_bits_to_float(static_cast<uint16_t const*>(row)[index]);
    case ElementKind::kFloat16: return fp16_bits_to_float(static_cast<uint16_t const*>(row)[index]);
    case ElementKind::kFloat32: break;
  }
  return static_cast<float const*>(row)[index];
}

// Stores `value` rounded to `kind` as element `index` of `row`.
EPCOMM_HOST_DEVICE void store_element(void* row, int64_t index, float value, ElementKind kind) {
  switch (kind) {
    case ElementKind::kBfloat16: static_cast<uint16_t*>(row)[index] = float_to_bf16_bits(value); return;
    case ElementKind::kFloat16: static_cast<uint16_t*>(row)[index] = float_to_fp16_bits(value); return;
    case ElementKind::kFloat32: break;
  }
  static_cast<float*>(row)[index] = value;
}

}  // namespace epcomm::kernels
