// Acquire/release spin-waits across blocks and across ranks (grids) through a
// ring buffer that wraps many times, and schedule fuzzing. Also built with the
// planted-bug flags of kernels/ring_channel.cuh, where these tests must fail.
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "harness.hpp"
#include "kernels/ring_channel.cuh"

using namespace epcomm;

namespace {

int const kRingMessages = test::kSanitized ? 300 : 3000;
int const kRingSlots = 4;  // small: the ring wraps hundreds of times

simt::LaunchOptions options_named(char const* name, std::optional<uint64_t> seed = std::nullopt) {
  simt::LaunchOptions options;
  options.name = name;
  options.fuzz_seed = seed;
  return options;
}

// Ring buffers owned by one "rank" (or block pair).
struct RingStorage {
  std::vector<int> slots, heads, tails;
  std::vector<test::RingChannel> channels;
  explicit RingStorage(int num_channels)
      : slots(size_t(num_channels) * kRingSlots * test::kRingSlotInts), heads(num_channels), tails(num_channels) {
    for (int c = 0; c < num_channels; ++c)
      channels.push_back({&slots[size_t(c) * kRingSlots * test::kRingSlotInts], &heads[c], &tails[c], kRingSlots});
  }
};

long long expected_ring_result(int num_messages, int seed) {
  long long sum = 0;
  for (int m = 0; m < num_messages; ++m)
    for (int lane = 0; lane < 32; ++lane) sum += test::ring_payload(m, lane, seed);
  return sum * 1024;  // zero mismatches
}

std::vector<long long> run_ring_blocks(std::optional<uint64_t> seed) {
  int const num_channels = 2;
  RingStorage storage(num_channels);
  std::vector<long long> results(num_channels, -1);
  simt::launch(options_named("ring_blocks", seed), 2 * num_channels, 32, 0, test::ring_blocks_kernel,
               storage.channels.data(), results.data(), kRingMessages, 7);
  return results;
}

EPCOMM_TEST(ring_across_blocks) {
  std::vector<long long> results = run_ring_blocks(std::nullopt);
  for (int c = 0; c < 2; ++c) CHECK_EQ(results[c], expected_ring_result(kRingMessages, 7 + c));
}

// Two ranks (grids) in one process, each sending to the other on every block.
std::vector<long long> run_ring_ranks(std::optional<uint64_t> seed) {
  int const num_ranks = 2, num_blocks = 2;
  std::vector<RingStorage> storage;
  for (int r = 0; r < num_ranks; ++r) storage.emplace_back(num_blocks);
  std::vector<long long> results(num_ranks * num_blocks, -1);
  simt::ConcurrentLaunch ranks(options_named("ring_ranks", seed));
  for (int r = 0; r < num_ranks; ++r) {
    test::RingRankArgs args{storage[(r + 1) % num_ranks].channels.data(), storage[r].channels.data(),
                            &results[r * num_blocks], r, num_ranks, kRingMessages};
    ranks.add("rank" + std::to_string(r), num_blocks, 64, 0, test::ring_ranks_kernel, args);
  }
  ranks.run();
  return results;
}

void check_ring_ranks(std::vector<long long> const& results) {
  for (int r = 0; r < 2; ++r)
    for (int b = 0; b < 2; ++b)
      CHECK_EQ(results[r * 2 + b], expected_ring_result(kRingMessages, test::ring_rank_seed((r + 1) % 2, b)));
}

EPCOMM_TEST(ring_across_ranks) { check_ring_ranks(run_ring_ranks(std::nullopt)); }

// Each thread of one block takes a ticket; the ticket order is the schedule.
EPCOMM_GLOBAL void ticket_kernel(int* counter, int* order) {
  int const ticket = atomicAdd(counter, 1);
  order[ticket] = int(threadIdx.x);
}

std::vector<int> ticket_order(uint64_t seed) {
  int counter = 0;
  std::vector<int> order(128, -1);
  simt::launch(options_named("tickets", seed), 1, 128, 0, ticket_kernel, &counter, order.data());
  return order;
}

EPCOMM_TEST(fuzz_seeds_change_the_schedule_not_the_result) {
  // Without fuzzing, the schedule inside a block is deterministic.
  CHECK(ticket_order(0) == ticket_order(0));
  int num_different = 0;
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    CHECK(ticket_order(seed) == ticket_order(seed));  // a seed replays its schedule
    num_different += ticket_order(seed) != ticket_order(0);
    check_ring_ranks(run_ring_ranks(seed));
    std::vector<long long> blocks = run_ring_blocks(seed);
    for (int c = 0; c < 2; ++c) CHECK_EQ(blocks[c], expected_ring_result(kRingMessages, 7 + c));
  }
  CHECK(num_different >= 8);
}

}  // namespace
