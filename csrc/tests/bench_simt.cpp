// Costs of the SIMT layer: launch overhead, fiber switch, barrier, a DeepEP-sized launch.
// Usage: bench_simt [--quick]
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"

using namespace epcomm;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

EPCOMM_GLOBAL void empty_kernel() {}

EPCOMM_GLOBAL void polling_kernel(int* word, int num_polls) {
  int sum = 0;
  for (int i = 0; i < num_polls; ++i) sum += ptx::ld_relaxed_sys_global(word);
  if (sum < 0) __trap();
}

EPCOMM_GLOBAL void barrier_kernel(int num_barriers) {
  for (int i = 0; i < num_barriers; ++i) __syncthreads();
}

EPCOMM_GLOBAL void rounds_kernel(int* out, int num_rounds) {
  __shared__ int values[1024];
  int total = 0;
  for (int round = 0; round < num_rounds; ++round) {
    values[threadIdx.x] = int(threadIdx.x) + round;
    __syncthreads();
    total += __shfl_xor_sync(0xffffffffu, values[(threadIdx.x + 1) % blockDim.x], 1);
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out, total);
}

void launch_overhead(char const* label, int num_ranks, int num_blocks, int num_threads, int repeats) {
  auto start = Clock::now();
  for (int i = 0; i < repeats; ++i) {
    simt::ConcurrentLaunch launch;
    for (int r = 0; r < num_ranks; ++r) launch.add("rank" + std::to_string(r), num_blocks, num_threads, 0, empty_kernel);
    launch.run();
  }
  std::printf("launch overhead, %-28s %8.3f ms per launch\n", label, seconds_since(start) * 1e3 / repeats);
}

}  // namespace

int main(int argc, char** argv) {
  bool const quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  launch_overhead("1 block x 32 threads:", 1, 1, 32, quick ? 20 : 200);
  launch_overhead("4 blocks x 128 threads:", 1, 4, 128, quick ? 10 : 50);
  launch_overhead("4 ranks x 4 blocks x 128:", 4, 4, 128, quick ? 5 : 20);

  int word = 1;
  for (int num_threads : {2, 256}) {
    int const num_polls = (quick ? 200000 : 2000000) / num_threads;
    auto start = Clock::now();
    simt::launch(1, num_threads, 0, polling_kernel, &word, num_polls);
    double const switches = double(num_threads) * num_polls;
    std::printf("sync point + fiber switch, %3d threads in a block:  %6.1f ns each\n", num_threads,
                seconds_since(start) * 1e9 / switches);
  }

  {
    int const num_barriers = quick ? 200 : 2000;
    auto start = Clock::now();
    simt::launch(1, 256, 0, barrier_kernel, num_barriers);
    std::printf("__syncthreads, 256 threads:                 %6.2f us per barrier (%5.1f ns per thread)\n",
                seconds_since(start) * 1e6 / num_barriers, seconds_since(start) * 1e9 / num_barriers / 256);
  }

  if (!quick) {
    int const num_ranks = 8, num_blocks = 24, num_threads = 768, num_rounds = 10;
    std::vector<int> out(num_ranks);
    auto start = Clock::now();
    simt::ConcurrentLaunch launch;
    for (int r = 0; r < num_ranks; ++r)
      launch.add("rank" + std::to_string(r), num_blocks, num_threads, 0, rounds_kernel, &out[r], num_rounds);
    launch.run();
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    std::printf("DeepEP-sized launch (8 ranks x 24 blocks x 768 threads = %d fibers), %d rounds of 2 "
                "__syncthreads + shuffle: %.2f s, peak RSS %ld MiB\n",
                num_ranks * num_blocks * num_threads, num_rounds, seconds_since(start), usage.ru_maxrss / 1024);
  }
  return 0;
}
