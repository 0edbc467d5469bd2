#pragma once
// Human-readable dump of what every warp of a launch is doing or waiting on,
// attached to timeout and deadlock errors. Lanes of a warp with the same
// story are merged ("lanes 1-31: blocked in __syncwarp ...").

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "block.hpp"

namespace epcomm::simt {

namespace detail {

inline char const* short_path(char const* path) {
  if (!path) return "?";
  char const* tail = path;
  for (char const* p = path; *p; ++p) {
    if (p[0] == 'c' && std::strncmp(p, "csrc/", 5) == 0) tail = p;  // keep the project-relative part
  }
  return tail;
}

inline std::string describe_site(WaitRecord const& wait) {
  char buffer[640];
  std::snprintf(buffer, sizeof buffer, "at %s:%u (%s)", short_path(wait.file.load()), unsigned(wait.line.load()),
                wait.function.load() ? wait.function.load() : "?");
  return buffer;
}

inline std::string describe_thread(Block const& block, SimtThread const& thread) {
  WaitRecord const& wait = thread.wait;
  RunState const state = thread.state.load();
  if (state == RunState::Exited) return "exited";
  if (wait.kind.load() == SyncKind::None) return std::string(run_state_name(state)) + ", no sync point reached yet";
  char what[256];
  switch (wait.kind.load()) {
    case SyncKind::Barrier: {
      uint32_t id = uint32_t(wait.detail_a.load()), count = uint32_t(wait.detail_b.load());
      std::snprintf(what, sizeof what, "%s(id=%u, threads=%s) [%u arrived]", wait.what.load(), id,
                    count ? std::to_string(count).c_str() : "all live", block.barriers().arrived(id));
      break;
    }
    case SyncKind::WarpCollective: {
      uint32_t mask = uint32_t(wait.detail_a.load());
      uint32_t missing = block.warp(thread.warp_idx).missing_lanes(mask);
      std::snprintf(what, sizeof what, "%s(mask=0x%08x) [lanes not arrived: 0x%08x]", wait.what.load(), mask, missing);
      break;
    }
    case SyncKind::Load:
    case SyncKind::Store:
    case SyncKind::Atomic:
      std::snprintf(what, sizeof what, "%s(%p) [%llu consecutive, last value %llu (0x%llx)]", wait.what.load(),
                    reinterpret_cast<void*>(wait.address.load()), (unsigned long long)wait.repeats.load(),
                    (unsigned long long)wait.last_value.load(), (unsigned long long)wait.last_value.load());
      break;
    default:
      std::snprintf(what, sizeof what, "%s() [%llu consecutive]", wait.what.load(),
                    (unsigned long long)wait.repeats.load());
  }
  std::string verb = state == RunState::Blocked ? "blocked in " : "spinning/last sync point ";
  return verb + what + " " + describe_site(wait);
}

inline std::string lane_range(uint32_t first, uint32_t last) {
  return first == last ? "lane " + std::to_string(first)
                       : "lanes " + std::to_string(first) + "-" + std::to_string(last);
}

}  // namespace detail

// Appends the dump of one block; `line_budget` caps the output of a whole launch.
inline void describe_block(Block const& block, std::string& out, int& line_budget) {
  bool all_exited = true;
  for (uint32_t i = 0; i < block.num_threads() && all_exited; ++i)
    all_exited = block.thread(i).state.load() == RunState::Exited;
  if (all_exited || line_budget <= 0) return;
  out += "  " + block.name() + (block.finished() ? "" : " (its OS thread is still running)") + ":\n";
  --line_budget;
  for (uint32_t w = 0; w < block.num_warps() && line_budget > 0; ++w) {
    uint32_t first_lane = w * kWarpSize;
    uint32_t lanes = std::min(kWarpSize, block.num_threads() - first_lane);
    uint32_t run_start = 0;
    std::string run_story = detail::describe_thread(block, block.thread(first_lane));
    for (uint32_t lane = 1; lane <= lanes; ++lane) {
      std::string story = lane < lanes ? detail::describe_thread(block, block.thread(first_lane + lane)) : "";
      if (lane < lanes && story == run_story) continue;
      if (line_budget-- > 0)
        out += "    warp " + std::to_string(w) + " " + detail::lane_range(run_start, lane - 1) + ": " + run_story + "\n";
      run_start = lane;
      run_story = story;
    }
  }
}

inline std::string describe_blocks(std::vector<std::unique_ptr<Block>> const& blocks, int max_lines = 200) {
  std::string out = "what each warp was doing (lanes with the same state merged; exited blocks omitted):\n";
  int line_budget = max_lines;
  for (auto const& block : blocks) describe_block(*block, out, line_budget);
  if (line_budget <= 0) out += "  ... (dump truncated)\n";
  return out;
}

}  // namespace epcomm::simt
