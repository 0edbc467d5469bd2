// Atomics and the ptx.cuh helpers outside kernels.
#include <atomic>
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "harness.hpp"

using namespace epcomm;

namespace {

simt::LaunchOptions options_named(char const* name, std::optional<uint64_t> seed = std::nullopt) {
  simt::LaunchOptions options;
  options.name = name;
  options.fuzz_seed = seed;
  return options;
}

struct AtomicCounters {
  int count;
  unsigned long long big;
  float float_sum;
  int maximum, minimum;
  unsigned exchanged_bits;
  int cas_count;
  unsigned wrapping;
};

EPCOMM_GLOBAL void atomics_kernel(AtomicCounters* counters) {
  int const tid = int(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&counters->count, 1);
  atomicAdd(&counters->big, 1ull << 33);
  atomicAdd(&counters->float_sum, 0.5f);
  atomicMax(&counters->maximum, tid);
  atomicMin(&counters->minimum, -tid);
  atomicOr(&counters->exchanged_bits, 1u << (tid % 32));
  atomicInc(&counters->wrapping, 99u);
  // An increment built from compare-and-swap: retries until it wins.
  int old = atomicCAS(&counters->cas_count, 0, 0);  // a relaxed read of the current value
  while (true) {
    int seen = atomicCAS(&counters->cas_count, old, old + 1);
    if (seen == old) break;
    old = seen;
  }
}

EPCOMM_TEST(atomics_across_blocks) {
  AtomicCounters counters{0, 0, 0.0f, -1, 1, 0, 0, 0};
  int const num_threads = 4 * 128;
  simt::launch(options_named("atomics"), 4, 128, 0, atomics_kernel, &counters);
  CHECK_EQ(counters.count, num_threads);
  CHECK_EQ(counters.big, (unsigned long long)num_threads << 33);
  CHECK_EQ(counters.float_sum, num_threads * 0.5f);
  CHECK_EQ(counters.maximum, num_threads - 1);
  CHECK_EQ(counters.minimum, -(num_threads - 1));
  CHECK_EQ(counters.exchanged_bits, 0xffffffffu);
  CHECK_EQ(counters.cas_count, num_threads);
  CHECK_EQ(counters.wrapping, unsigned(num_threads % 100));
}

EPCOMM_TEST(ptx_helpers_work_in_plain_host_code) {
  int flag = 0;
  ptx::st_release_sys_global(&flag, 5);
  CHECK_EQ(ptx::ld_acquire_sys_global(&flag), 5);
  CHECK_EQ(ptx::atomic_add_release_sys_global(&flag, 2), 5);
  CHECK_EQ(ptx::ld_relaxed_sys_global(&flag), 7);
  long long wide = 1ll << 40;
  CHECK_EQ(ptx::ld_volatile_global(&wide), 1ll << 40);
  ptx::fence_acq_rel_sys();
}

}  // namespace
