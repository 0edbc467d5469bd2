// Warp collectives: shuffles, votes, elect, sub-warp masks, misuse.
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "harness.hpp"

using namespace epcomm;

namespace {

simt::LaunchOptions quick_options(char const* name) {
  simt::LaunchOptions options;
  options.name = name;
  options.timeout = std::chrono::seconds(20);
  return options;
}

enum ShuffleResult { kIdx, kUp, kDown, kXor, kIdxWidth8, kXorWidth8, kDownWidth16, kDouble, kNumShuffleResults };

EPCOMM_GLOBAL void shuffles_kernel(long long* out) {
  int const lane = int(threadIdx.x) % 32;
  int const warp = int(threadIdx.x) / 32;
  int const value = lane * 10 + warp * 1000;
  long long* mine = out + threadIdx.x * kNumShuffleResults;
  mine[kIdx] = __shfl_sync(0xffffffffu, value, (lane + 3) % 32);
  mine[kUp] = __shfl_up_sync(0xffffffffu, value, 2);
  mine[kDown] = __shfl_down_sync(0xffffffffu, value, 5);
  mine[kXor] = __shfl_xor_sync(0xffffffffu, value, 1);
  mine[kIdxWidth8] = __shfl_sync(0xffffffffu, value, 9, 8);  // lane 1 of each group of 8
  mine[kXorWidth8] = __shfl_xor_sync(0xffffffffu, value, 12, 8);
  mine[kDownWidth16] = __shfl_down_sync(0xffffffffu, value, 4, 16);
  mine[kDouble] = (long long)(ptx::shfl_sync(0xffffffffu, double(value) + 0.5, 31) * 2);
}

EPCOMM_TEST(shuffles_full_mask_and_widths) {
  std::vector<long long> out(64 * kNumShuffleResults);
  simt::launch(quick_options("shuffles"), 1, 64, 0, shuffles_kernel, out.data());
  for (int t = 0; t < 64; ++t) {
    int lane = t % 32, warp = t / 32;
    auto value = [&](int l) { return l * 10 + warp * 1000; };
    long long const* r = &out[t * kNumShuffleResults];
    CHECK_EQ(r[kIdx], value((lane + 3) % 32));
    CHECK_EQ(r[kUp], value(lane >= 2 ? lane - 2 : lane));
    CHECK_EQ(r[kDown], value(lane + 5 < 32 ? lane + 5 : lane));
    CHECK_EQ(r[kXor], value(lane ^ 1));
    CHECK_EQ(r[kIdxWidth8], value((lane & ~7) + 1));
    int xor_source = lane ^ 12;
    CHECK_EQ(r[kXorWidth8], value(xor_source / 8 > lane / 8 ? lane : xor_source));
    CHECK_EQ(r[kDownWidth16], value(lane % 16 + 4 < 16 ? lane + 4 : lane));
    CHECK_EQ(r[kDouble], value(31) * 2 + 1);
  }
}

// Lanes 0-15 and 16-31 run different collectives on disjoint masks at the same time.
EPCOMM_GLOBAL void sub_warp_kernel(int* out) {
  int const lane = int(threadIdx.x);
  if (lane < 16) {
    int value = lane;
    for (int round = 0; round < 5; ++round) value += __shfl_xor_sync(0x0000ffffu, value, 1 << (round % 4));
    out[lane] = value;
  } else {
    unsigned votes = 0;
    for (int round = 0; round < 5; ++round) votes ^= __ballot_sync(0xffff0000u, (lane + round) % 3 == 0);
    __syncwarp(0xffff0000u);
    out[lane] = int(votes);
  }
}

EPCOMM_TEST(disjoint_sub_warp_masks_run_concurrently) {
  std::vector<int> out(32);
  simt::launch(quick_options("sub_warp"), 1, 32, 0, sub_warp_kernel, out.data());
  std::vector<int> values(16);
  for (int lane = 0; lane < 16; ++lane) values[lane] = lane;
  for (int round = 0; round < 5; ++round) {
    std::vector<int> next(16);
    for (int lane = 0; lane < 16; ++lane) next[lane] = values[lane] + values[lane ^ (1 << (round % 4))];
    values = next;
  }
  unsigned votes = 0;
  for (int round = 0; round < 5; ++round) {
    unsigned ballot = 0;
    for (int lane = 16; lane < 32; ++lane) ballot |= unsigned((lane + round) % 3 == 0) << lane;
    votes ^= ballot;
  }
  for (int lane = 0; lane < 16; ++lane) CHECK_EQ(out[lane], values[lane]);
  for (int lane = 16; lane < 32; ++lane) CHECK_EQ(unsigned(out[lane]), votes);
}

EPCOMM_GLOBAL void votes_kernel(unsigned* out) {
  int const lane = int(threadIdx.x);
  unsigned ballot = ptx::ballot_sync(0xffffffffu, lane % 5 == 0);
  int any_high = __any_sync(0xffffffffu, lane == 31);
  int none = __any_sync(0xffffffffu, 0);
  int all_small = __all_sync(0xffffffffu, lane < 32);
  int all_even = __all_sync(0xffffffffu, lane % 2 == 0);
  if (lane == 0) {
    out[0] = ballot;
    out[1] = unsigned(any_high);
    out[2] = unsigned(none);
    out[3] = unsigned(all_small);
    out[4] = unsigned(all_even);
  }
}

EPCOMM_TEST(ballot_any_all) {
  std::vector<unsigned> out(5);
  simt::launch(quick_options("votes"), 1, 32, 0, votes_kernel, out.data());
  unsigned expected = 0;
  for (int lane = 0; lane < 32; lane += 5) expected |= 1u << lane;
  CHECK_EQ(out[0], expected);
  CHECK_EQ(out[1], 1u);
  CHECK_EQ(out[2], 0u);
  CHECK_EQ(out[3], 1u);
  CHECK_EQ(out[4], 0u);
}

EPCOMM_GLOBAL void elect_kernel(int* elected_full, int* elected_sub, unsigned* active) {
  int const lane = int(ptx::get_lane_id());
  if (ptx::elect_one_sync()) atomicAdd(&elected_full[lane], 1);
  if (lane >= 4 && lane < 8) {
    if (ptx::elect_one_sync(0x000000f0u)) atomicAdd(&elected_sub[lane], 1);
  }
  if (lane >= 20) return;
  unsigned mask = __activemask();
  if (lane == 0) *active = mask;
}

EPCOMM_TEST(elect_one_and_activemask) {
  std::vector<int> full(32), sub(32);
  unsigned active = 0;
  simt::launch(quick_options("elect"), 1, 32, 0, elect_kernel, full.data(), sub.data(), &active);
  for (int lane = 0; lane < 32; ++lane) {
    CHECK_EQ(full[lane], lane == 0 ? 1 : 0);
    CHECK_EQ(sub[lane], lane == 4 ? 1 : 0);
  }
  CHECK((active & 0xfffffu) == 0xfffffu);  // lanes 20+ may or may not have exited yet
}

EPCOMM_GLOBAL void lane_outside_mask_kernel() {
  if (threadIdx.x == 3) __syncwarp(0x1u);
}

EPCOMM_TEST(lane_outside_its_mask_is_an_error) {
  std::string message = CHECK_LAUNCH_FAILS(simt::try_launch(quick_options("outside"), 1, 32, 0, lane_outside_mask_kernel),
                                           simt::ErrorKind::InvalidUsage);
  CHECK_CONTAINS(message, "__syncwarp(mask=0x00000001)");
  CHECK_CONTAINS(message, "not in its own member mask");
  CHECK_CONTAINS(message, "thread (3,0,0)");
}

EPCOMM_GLOBAL void overlapping_masks_kernel() {
  // Lane 0 waits in a collective over lanes {0,1}; lane 1 calls one over {1,2}.
  if (threadIdx.x == 0) __syncwarp(0x3u);
  else if (threadIdx.x == 1) __syncwarp(0x6u);
}

EPCOMM_TEST(overlapping_masks_are_an_error) {
  std::string message = CHECK_LAUNCH_FAILS(
      simt::try_launch(quick_options("overlap"), 1, 32, 0, overlapping_masks_kernel), simt::ErrorKind::InvalidUsage);
  CHECK_CONTAINS(message, "overlaps the member mask");
}

}  // namespace
