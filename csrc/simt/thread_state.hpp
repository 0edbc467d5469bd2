#pragma once
// SimtThread: everything the SIMT layer keeps about one CUDA thread.

#include <cstdint>

#include "dim3.hpp"
#include "fiber.hpp"
#include "relaxed.hpp"
#include "sync_site.hpp"

namespace epcomm::simt {

inline constexpr uint32_t kWarpSize = 32;
inline constexpr uint32_t kFullWarpMask = 0xffffffffu;

enum class RunState : uint8_t {
  NotStarted,
  Ready,    // runnable, in the block's ready queue
  Running,  // the fiber on the CPU
  Blocked,  // waiting on a barrier or warp collective until woken
  Exited,
};

inline char const* run_state_name(RunState state) {
  switch (state) {
    case RunState::NotStarted: return "not started";
    case RunState::Ready: return "ready";
    case RunState::Running: return "running";
    case RunState::Blocked: return "blocked";
    case RunState::Exited: return "exited";
  }
  return "?";
}

struct SimtThread {
  // Identity, fixed before the fiber starts.
  Dim3 thread_idx;
  uint32_t linear_idx = 0;
  uint32_t warp_idx = 0;
  uint32_t lane_idx = 0;

  FiberContext context;
  Relaxed<RunState> state{RunState::NotStarted};
  Relaxed<bool> has_left{false};         // switched away for good (exited or abandoned)
  Relaxed<int32_t> waiting_barrier{-1};  // barrier id while blocked in bar_sync / __syncthreads
  WaitRecord wait;
};

}  // namespace epcomm::simt
