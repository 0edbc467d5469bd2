#pragma once
// What every CPU-target launcher (*_launch_simt.cpp) does before adding a rank's grid to a
// simt::ConcurrentLaunch: refuse invalid arguments with the validator's message (before any grid size
// is computed from them), and name the grid after its rank and kernel, so that watchdog dumps and
// launch errors say which rank was where.

#include <stdexcept>
#include <string>

namespace epcomm::kernels {

// "rank<r>/<kernel>"
inline std::string rank_grid_name(char const* kernel, int rank) {
  return "rank" + std::to_string(rank) + "/" + kernel;
}

// `validate(args)` is the overload of the kernel family's *_validate.hpp, found by argument lookup.
template <class Args>
void throw_if_invalid(Args const& args) {
  if (char const* problem = validate(args)) throw std::invalid_argument(std::string("epcomm: ") + problem);
}

}  // namespace epcomm::kernels
