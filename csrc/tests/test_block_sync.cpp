// __syncthreads, dynamic shared memory, named barriers, exited threads, block deadlocks.
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "harness.hpp"

using namespace epcomm;

namespace {

simt::LaunchOptions quick_options(char const* name, int timeout_ms = 20000) {
  simt::LaunchOptions options;
  options.name = name;
  options.timeout = std::chrono::milliseconds(timeout_ms);
  return options;
}

// Each round: every thread writes its slot, then reads its mirror slot.
EPCOMM_GLOBAL void mirror_kernel(int* out, int num_rounds) {
  __shared__ int values[64];
  uint32_t const num_threads = blockDim.x * blockDim.y * blockDim.z;
  uint32_t const tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  uint32_t const block_linear = blockIdx.x + gridDim.x * blockIdx.y;
  int total = 0;
  for (int round = 0; round < num_rounds; ++round) {
    values[tid] = int(tid) * 100 + round + int(block_linear) * 10000;
    __syncthreads();
    total += values[num_threads - 1 - tid];
    __syncthreads();
  }
  out[block_linear * num_threads + tid] = total;
}

EPCOMM_TEST(syncthreads_3d_block_and_grid) {
  int const num_rounds = 20;
  simt::Dim3 const grid(2, 2), block(8, 4, 2);
  std::vector<int> out(4 * 64, -1);
  simt::launch(quick_options("mirror"), grid, block, 0, mirror_kernel, out.data(), num_rounds);
  for (int b = 0; b < 4; ++b) {
    for (int t = 0; t < 64; ++t) {
      int expected = 0;
      for (int round = 0; round < num_rounds; ++round) expected += (63 - t) * 100 + round + b * 10000;
      CHECK_EQ(out[b * 64 + t], expected);
    }
  }
}

EPCOMM_GLOBAL void dynamic_smem_kernel(unsigned* first_words, int* sums) {
  EPCOMM_DYNAMIC_SMEM(unsigned, words);
  if (threadIdx.x == 0) first_words[blockIdx.x] = words[0];
  __syncthreads();
  words[threadIdx.x] = threadIdx.x + blockIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += int(words[i]);
    sums[blockIdx.x] = sum;
  }
}

EPCOMM_TEST(dynamic_smem_is_per_block_and_poisoned) {
  std::vector<unsigned> first(3);
  std::vector<int> sums(3);
  simt::launch(quick_options("dynamic_smem"), 3, 64, 64 * sizeof(unsigned), dynamic_smem_kernel, first.data(),
               sums.data());
  for (int b = 0; b < 3; ++b) {
    CHECK_EQ(first[b], 0xCDCDCDCDu);
    CHECK_EQ(sums[b], 63 * 64 / 2 + 64 * b);
  }
}

// Warps 0-3 and warps 4-7 each synchronise among themselves (128 threads) on
// different barrier ids, many times, without ever waiting for each other.
EPCOMM_GLOBAL void two_groups_kernel(int* out, int num_rounds) {
  __shared__ int group_values[2][128];
  int const group = int(threadIdx.x) / 128;
  int const idx = int(threadIdx.x) % 128;
  int total = 0;
  for (int round = 0; round < num_rounds; ++round) {
    group_values[group][idx] = idx + round * (group + 1);
    ptx::bar_sync(1 + group, 128);
    total += group_values[group][(idx + 1) % 128];
    ptx::bar_sync(1 + group, 128);
  }
  out[threadIdx.x] = total;
}

EPCOMM_TEST(named_barriers_with_partial_counts) {
  int const num_rounds = 15;
  std::vector<int> out(256);
  simt::launch(quick_options("two_groups"), 1, 256, 0, two_groups_kernel, out.data(), num_rounds);
  for (int t = 0; t < 256; ++t) {
    int group = t / 128, idx = t % 128, expected = 0;
    for (int round = 0; round < num_rounds; ++round) expected += (idx + 1) % 128 + round * (group + 1);
    CHECK_EQ(out[t], expected);
  }
}

// Producer warp 0 fills a buffer and arrives on barrier 3; consumer warp 1
// syncs on it, then hands the buffer back through barrier 4.
EPCOMM_GLOBAL void arrive_sync_kernel(int* out, int num_rounds) {
  __shared__ int buffer[32];
  int const lane = int(threadIdx.x) % 32;
  int total = 0;
  for (int round = 0; round < num_rounds; ++round) {
    if (threadIdx.x < 32) {
      buffer[lane] = round * 32 + lane;
      ptx::bar_arrive(3, 64);  // buffer full
      ptx::bar_sync(4, 64);    // wait until it was read
    } else {
      ptx::bar_sync(3, 64);
      total += buffer[31 - lane];
      ptx::bar_arrive(4, 64);
    }
  }
  if (threadIdx.x >= 32) out[lane] = total;
}

EPCOMM_TEST(bar_arrive_and_bar_sync_producer_consumer) {
  int const num_rounds = 25;
  std::vector<int> out(32);
  simt::launch(quick_options("arrive_sync"), 1, 64, 0, arrive_sync_kernel, out.data(), num_rounds);
  for (int lane = 0; lane < 32; ++lane) {
    int expected = 0;
    for (int round = 0; round < num_rounds; ++round) expected += round * 32 + 31 - lane;
    CHECK_EQ(out[lane], expected);
  }
}

EPCOMM_GLOBAL void count_mismatch_kernel() { ptx::bar_sync(2, threadIdx.x < 32 ? 64 : 96); }

EPCOMM_TEST(barrier_thread_count_mismatch_is_an_error) {
  std::string message = CHECK_LAUNCH_FAILS(simt::try_launch(quick_options("mismatch"), 1, 96, 0, count_mismatch_kernel),
                                           simt::ErrorKind::InvalidUsage);
  CHECK_CONTAINS(message, "bar_sync");
  CHECK_CONTAINS(message, "thread count");
  CHECK_CONTAINS(message, "test_block_sync.cpp");
}

// Threads >= 40 exit at once; the others keep using __syncthreads and warp 1's
// remaining lanes keep using full-mask warp collectives.
EPCOMM_GLOBAL void early_exit_kernel(int* out, unsigned* ballots) {
  __shared__ int values[64];
  if (threadIdx.x >= 40) return;
  int total = 0;
  for (int round = 0; round < 10; ++round) {
    values[threadIdx.x] = int(threadIdx.x) + round;
    __syncthreads();
    total += values[39 - threadIdx.x];
    __syncthreads();
  }
  __syncwarp();
  unsigned ballot = __ballot_sync(0xffffffffu, 1);
  int from_lane_32 = __shfl_sync(0xffffffffu, int(threadIdx.x), 0);
  out[threadIdx.x] = total + (threadIdx.x >= 32 ? from_lane_32 * 1000 : 0);
  if (threadIdx.x % 32 == 0) ballots[threadIdx.x / 32] = ballot;
}

EPCOMM_TEST(exited_threads_stop_counting) {
  std::vector<int> out(40);
  std::vector<unsigned> ballots(2);
  simt::launch(quick_options("early_exit"), 1, 64, 0, early_exit_kernel, out.data(), ballots.data());
  for (int t = 0; t < 40; ++t) {
    int expected = 0;
    for (int round = 0; round < 10; ++round) expected += 39 - t + round;
    if (t >= 32) expected += 32 * 1000;
    CHECK_EQ(out[t], expected);
  }
  CHECK_EQ(ballots[0], 0xffffffffu);
  CHECK_EQ(ballots[1], 0x000000ffu);
}

// Warp 1 exits; warp 0 waits for 64 threads on barrier 1 forever.
EPCOMM_GLOBAL void block_deadlock_kernel() {
  if (threadIdx.x >= 32) return;
  ptx::bar_sync(1, 64);
}

EPCOMM_TEST(block_deadlock_is_reported_at_once) {
  auto const start = std::chrono::steady_clock::now();
  std::string message = CHECK_LAUNCH_FAILS(
      simt::try_launch(quick_options("deadlock", 60000), 1, 64, 0, block_deadlock_kernel), simt::ErrorKind::Deadlock);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));  // not the 60 s watchdog
  CHECK_CONTAINS(message, "bar_sync(id=1, threads=64) [32 arrived]");
  CHECK_CONTAINS(message, "warp 0 lanes 0-31: blocked in");
  CHECK_CONTAINS(message, "test_block_sync.cpp");
}

}  // namespace
