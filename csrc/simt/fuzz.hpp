#pragma once
// Schedule fuzzing: a seed turns the block's deterministic round-robin into a
// reproducible random schedule (random pick among runnable threads, sync
// points that sometimes do not yield, occasional extra OS-level yields).
// The same seed gives the same fiber-level choices; the OS still interleaves
// blocks as it likes.

#include <sched.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <thread>

#include "relaxed.hpp"

namespace epcomm::simt {

// The seed from EPCOMM_SIMT_SEED, if set (0 means "no fuzzing").
inline std::optional<uint64_t> fuzz_seed_from_env() {
  char const* env = std::getenv("EPCOMM_SIMT_SEED");
  if (!env || !*env) return std::nullopt;
  return std::strtoull(env, nullptr, 0);
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Per block; its state is shared by the block's fibers (hence Relaxed).
class FuzzPolicy {
 public:
  FuzzPolicy() = default;
  // seed 0: fuzzing off. `stream` separates blocks and grids of one launch.
  void init(uint64_t seed, uint64_t stream) {
    enabled_ = seed != 0;
    state_.store(splitmix64(seed ^ splitmix64(stream)));
    // Each block gets its own eagerness to yield: 1/4, 2/4, 3/4 or 4/4.
    skip_quarters_ = enabled_ ? uint32_t(next() % 4) : 0;
  }
  bool enabled() const { return enabled_; }

  // At a non-blocking sync point: carry on without yielding?
  bool skip_yield() { return enabled_ && next() % 4 < skip_quarters_; }
  // Which of `count` runnable threads runs next (0 = the round-robin choice).
  uint32_t pick(uint32_t count) { return enabled_ && count > 1 ? uint32_t(next() % count) : 0; }
  // Perturb the OS-level interleaving of blocks now and then.
  void maybe_perturb_os() {
    if (!enabled_) return;
    uint64_t r = next() % 512;
    if (r == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
    else if (r < 8) sched_yield();
  }

 private:
  uint64_t next() {
    uint64_t x = state_.load() + 1;
    state_.store(x);
    return splitmix64(x);
  }
  bool enabled_ = false;
  uint32_t skip_quarters_ = 0;
  Relaxed<uint64_t> state_{0};
};

}  // namespace epcomm::simt
