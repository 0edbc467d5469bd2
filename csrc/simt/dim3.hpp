#pragma once
// Dim3: the host stand-in for CUDA's dim3 / uint3.

#include <cstdint>

namespace epcomm::simt {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  // Implicit from one number so `launch(num_blocks, num_threads, ...)` reads
  // like a <<<num_blocks, num_threads>>> launch.
  constexpr Dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr uint64_t volume() const { return uint64_t(x) * y * z; }
};

// Linear index -> (x, y, z), x fastest, as CUDA numbers threads and blocks.
constexpr Dim3 unflatten(uint64_t linear, Dim3 shape) {
  return Dim3(unsigned(linear % shape.x), unsigned(linear / shape.x % shape.y),
              unsigned(linear / (uint64_t(shape.x) * shape.y)));
}

}  // namespace epcomm::simt
