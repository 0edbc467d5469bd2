// ShmTransport (transport/shm_transport.cuh) with all ranks in one process:
// every rank's warps put rows with a signal into every peer's buffer and each
// receiver checks the bytes it sees after acquiring the signal (TSAN checks the
// ordering); byte counters by link class must match the traffic exactly.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../common/compat.cuh"
#include "../common/ptx.cuh"
#include "../transport/shm_transport.cuh"
#include "harness.hpp"
#include "test_common.hpp"

using namespace epcomm;
using transport::LinkClass;
using transport::ShmTransport;

namespace {

int const kMessages = test::kSanitized ? 20 : 200;
int const kWords = 40;  // per message: more than one warp-width of words

// Buffer layout of this test: [signals uint64 x 2R][staging R x kWords][inbox R (source) x kWords]
struct Layout {
  int num_ranks;
  size_t signals() const { return 0; }
  size_t staging(int peer) const { return 16 * size_t(num_ranks) + 4 * size_t(peer) * kWords; }
  size_t inbox(int source) const { return 16 * size_t(num_ranks) + 4 * size_t(num_ranks + source) * kWords; }
  size_t bytes() const { return 16 * size_t(num_ranks) + 4 * size_t(2 * num_ranks) * kWords; }
};

int32_t payload(int source, int message, int word) { return source * 1000003 + message * 977 + word; }

// Warp w of rank r: sends kMessages to peer w one after another (each waits for the peer's ack signal),
// and receives from source w: acquire the signal, check the words, ack with signal_add.
EPCOMM_GLOBAL void ping_kernel(ShmTransport transport, Layout layout, int* errors) {
  int const lane = int(ptx::get_lane_id()), peer = int(threadIdx.x) / 32;
  int const rank = transport.rank(), num_ranks = transport.num_ranks();
  if (peer >= num_ranks) return;
  char* const local = transport.local_buffer();
  // Signal ids: [0, R): "message from source s arrived" in the receiver; [R, 2R): "ack from peer p" in the sender
  if (blockIdx.x == 0) {
    for (int m = 0; m < kMessages; ++m) {
      // The peer acked message m - 1: the inbox is free again
      if (m > 0)
        while (transport.read_signal(num_ranks + peer) < uint64_t(m)) {
        }
      int32_t* staging = reinterpret_cast<int32_t*>(local + layout.staging(peer));
      for (int i = lane; i < kWords; i += 32) staging[i] = payload(rank, m, i);
      ptx::syncwarp();
      transport.put_signal(transport::WarpCoop{lane}, peer, layout.inbox(rank), layout.staging(peer), 4 * kWords, rank, 1);
    }
    transport.flush(transport::WarpCoop{lane});
  } else {
    int const source = peer;
    int32_t const* inbox = reinterpret_cast<int32_t const*>(local + layout.inbox(source));
    for (int m = 0; m < kMessages; ++m) {
      while (transport.read_signal(source) < uint64_t(m + 1)) {
      }
      ptx::syncwarp();
      for (int i = lane; i < kWords; i += 32)
        if (inbox[i] != payload(source, m, i)) atomicAdd(errors, 1);
      transport.signal_add(transport::WarpCoop{lane}, source, num_ranks + rank, 1);
    }
  }
}

EPCOMM_TEST(shm_transport_put_signal_and_counters) {
  for (int num_nvl_ranks : {1, 2}) {
    int const num_ranks = 4;
    Layout const layout{num_ranks};
    std::vector<std::unique_ptr<test::AlignedBuffer>> buffers;
    std::vector<char*> bases;
    for (int r = 0; r < num_ranks; ++r) {
      buffers.push_back(std::make_unique<test::AlignedBuffer>(layout.bytes()));
      bases.push_back(static_cast<char*>(buffers.back()->ptr));
    }
    std::vector<uint64_t> counters(size_t(num_ranks) * transport::kNumLinkClasses, 0);
    int errors = 0;
    simt::LaunchOptions options;
    options.name = "shm_transport";
    simt::ConcurrentLaunch launch(options);
    for (int r = 0; r < num_ranks; ++r) {
      ShmTransport t{r, num_ranks, num_nvl_ranks, bases.data(), layout.signals(), &counters[size_t(r) * 3]};
      launch.add("rank" + std::to_string(r), 2, 32 * num_ranks, 0, ping_kernel, t, layout, &errors);
    }
    launch.run();
    CHECK_EQ(errors, 0);
    // Every rank put kMessages x 4 * kWords bytes to every rank (itself included)
    uint64_t const per_peer = uint64_t(kMessages) * 4 * kWords;
    for (int r = 0; r < num_ranks; ++r) {
      uint64_t expected[3] = {0, 0, 0};
      for (int p = 0; p < num_ranks; ++p) expected[int(transport::link_class(r, p, num_nvl_ranks))] += per_peer;
      CHECK_EQ(counters[size_t(r) * 3 + int(LinkClass::kSelf)], expected[0]);
      CHECK_EQ(counters[size_t(r) * 3 + int(LinkClass::kNvlink)], expected[1]);
      CHECK_EQ(counters[size_t(r) * 3 + int(LinkClass::kNetwork)], expected[2]);
      uint64_t const* signals = reinterpret_cast<uint64_t const*>(bases[r] + layout.signals());
      for (int s = 0; s < 2 * num_ranks; ++s) CHECK_EQ(signals[s], uint64_t(kMessages));
    }
    CHECK(transport::link_class(0, 1, 2) == LinkClass::kNvlink && transport::link_class(0, 2, 2) == LinkClass::kNetwork);
  }
}

}  // namespace
