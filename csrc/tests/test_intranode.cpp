// The intranode kernels (layout, notify, dispatch, combine) with all ranks in
// one process: peer buffers are plain allocations, one grid per rank through
// simt::ConcurrentLaunch. Every output is compared bit for bit with a host
// reference written from the contract (reference.py), not from the kernels.
// Also built with the planted-bug flags of kernels/channel.cuh and
// kernels/intranode_dispatch.cuh, where these tests must fail.
#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/intranode.hpp"
#include "../kernels/intranode_validate.hpp"
#include "cluster_common.hpp"
#include "dispatch_reference.hpp"
#include "harness.hpp"
#include "normal_rank_buffers.hpp"
#include "test_common.hpp"

using namespace epcomm;
using test::error_text;
using test::ExpectedReceive;
using test::RankTokens;
using test::ref_bf16_to_float;
using test::token_counts;

namespace {

// ---- inputs (the host reference is dispatch_reference.hpp) --------------------

struct Shape {
  int num_ranks, num_channels, ring_tokens, chunk_tokens;
  std::vector<int> num_tokens;  // per rank
  int hidden;                   // elements; dispatch row = hidden bytes (fp8) or 2 * hidden (bf16)
  bool fp8;
  int num_topk = 4, num_local_experts = 3, expert_alignment = 1, rounds = 1;
  uint64_t seed = 1;

  test::DispatchShape dispatch_shape() const {
    return {num_local_experts, num_topk, test::row_hidden_bytes(hidden, fp8), test::row_scale_bytes(hidden, fp8)};
  }
};

std::vector<RankTokens> make_inputs(Shape const& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  int const num_experts = shape.num_ranks * shape.num_local_experts;
  std::vector<RankTokens> data(shape.num_ranks);
  for (int r = 0; r < shape.num_ranks; ++r) {
    RankTokens& d = data[r];
    test::fill_random_rows(d, shape.num_tokens[r], shape.dispatch_shape(), rng);
    d.topk_idx.resize(size_t(d.num_tokens) * shape.num_topk);
    d.topk_weights.resize(d.topk_idx.size());
    for (int t = 0; t < d.num_tokens; ++t) {
      std::vector<int64_t> experts(num_experts);
      for (int e = 0; e < num_experts; ++e) experts[e] = e;
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < shape.num_topk; ++k) {
        bool const none = rng() % 5 == 0 || k >= num_experts;
        d.topk_idx[size_t(t) * shape.num_topk + k] = none ? -1 : experts[k];
        d.topk_weights[size_t(t) * shape.num_topk + k] = float(rng() % 1000) / 997.0f;
      }
    }
  }
  return data;
}

// ---- device-side state of all ranks ----------------------------------------

struct Cluster : test::InProcessRanks {
  Shape shape;
  kernels::KernelConfig config;
  kernels::NvlWorkspace workspace;
  std::vector<void*> peer_buffers;

  Cluster(Shape const& s, std::optional<uint64_t> seed) : InProcessRanks("intranode", s.num_ranks, seed), shape(s) {
    config = {s.num_channels, s.chunk_tokens, s.ring_tokens};
    test::DispatchShape const rows = s.dispatch_shape();
    int const max_row_bytes = std::max(rows.hidden_bytes + rows.scale_bytes, 2 * s.hidden);
    workspace = kernels::NvlWorkspace({s.num_ranks, s.num_local_experts, s.num_topk, max_row_bytes}, config);
    for (int r = 0; r < s.num_ranks; ++r) peer_buffers.push_back(allocate(workspace.required_bytes()));
  }

  kernels::CommArgs comm(int rank) {
    kernels::CommArgs c = comm_for<kernels::CommArgs>(rank);
    c.config = config;
    c.workspace = workspace;
    c.peer_buffers = peer_buffers.data();
    return c;
  }
};

// get_dispatch_layout, checked against the definition: which ranks each token goes to, and the counts.
void run_layout_and_check_counts(Shape const& shape, RankTokens const& d, test::NormalRankBuffers& out) {
  test::run_layout(shape.dispatch_shape(), shape.num_ranks, d, out);
  std::vector<int32_t> per_rank(shape.num_ranks, 0), per_expert(shape.num_ranks * shape.num_local_experts, 0);
  for (int t = 0; t < d.num_tokens; ++t) {
    for (int k = 0; k < shape.num_topk; ++k) {
      int64_t e = d.topk_idx[size_t(t) * shape.num_topk + k];
      if (e >= 0) ++per_expert[e];
    }
    for (int r = 0; r < shape.num_ranks; ++r) per_rank[r] += test::token_goes_to(shape.dispatch_shape(), d, t, r);
  }
  CHECK(out.num_tokens_per_rank == per_rank);
  CHECK(out.num_tokens_per_expert == per_expert);
}

// One notify per rank with the given call-check fields; each rank's call_agreed (-1: not written).
std::vector<int32_t> run_call_check(Cluster& cluster, std::vector<int> const& flags, std::vector<int64_t> const& digests) {
  std::vector<int32_t> agreed(size_t(cluster.shape.num_ranks), -1);
  cluster.run_on_every_rank("notify_call_check", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    args.call_digest = digests[size_t(r)];
    args.call_flags = flags[size_t(r)];
    args.call_agreed = args.call_flags == kernels::kNoCallCheck ? nullptr : &agreed[size_t(r)];
    kernels::add_notify(launch, args);
  });
  return agreed;
}

// Every rank's layout of `data`, then a notify with its counts (barrier, prefix matrices; they carry a call
// check too, of digest `digest`) into `out`.
void notify_counts(Cluster& cluster, std::vector<RankTokens> const& data, std::vector<test::NormalRankBuffers>& out,
                   int64_t digest) {
  Shape const& shape = cluster.shape;
  for (int r = 0; r < shape.num_ranks; ++r) run_layout_and_check_counts(shape, data[r], out[r]);
  cluster.run_on_every_rank("notify", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    test::set_notify_counts(args, out[r], data[r], shape.num_ranks, shape.num_channels, shape.num_local_experts,
                            shape.expert_alignment, digest);
    kernels::add_notify(launch, args);
  });
}

// One dispatch + combine round on `cluster`, checked against the reference.
void run_round(Cluster& cluster, uint64_t data_seed) {
  Shape const& shape = cluster.shape;
  int const R = shape.num_ranks, C = shape.num_channels, K = shape.num_topk;
  int const num_experts = R * shape.num_local_experts;
  std::vector<RankTokens> data = make_inputs(shape, data_seed);
  std::vector<test::NormalRankBuffers> out(R);
  notify_counts(cluster, data, out, int64_t(data_seed));
  for (int r = 0; r < R; ++r) CHECK_EQ(out[r].call_agreed, 1);
  std::vector<ExpectedReceive> expected;
  for (int r = 0; r < R; ++r) {
    expected.push_back(test::expected_receive(shape.dispatch_shape(), data, r, shape.expert_alignment));
    ExpectedReceive const& e = expected[r];
    int const num_recv = int(e.recv_src_idx.size());
    CHECK_EQ(out[r].recv_rank_prefix[R], num_recv);
    for (int s = 0; s < R; ++s) {
      int first = 0;
      while (first < num_recv && e.recv_src_rank[first] < s) ++first;
      CHECK_EQ(out[r].recv_rank_prefix[s], first);
      CHECK_EQ(out[r].recv_channel_prefix[size_t(s) * (C + 1)], first);
    }
    CHECK(out[r].num_recv_tokens_per_expert == e.num_recv_tokens_per_expert);
  }

  // dispatch
  cluster.run_on_every_rank("dispatch", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::IntranodeDispatchArgs args;
    args.comm = cluster.comm(r);
    test::set_dispatch_rows(args, out[r], data[r], shape.dispatch_shape(), num_experts);
    kernels::add_intranode_dispatch(launch, args);
  });
  for (int r = 0; r < R; ++r) test::check_received_rows(out[r], expected[r], r);

  test::make_expert_outputs(out, shape.hidden, data_seed * 7919 + 1);

  // barrier (resets the rings), then combine
  cluster.run_on_every_rank("combine_barrier", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    kernels::add_notify(launch, args);
  });
  cluster.run_on_every_rank("combine", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::IntranodeCombineArgs args;
    args.comm = cluster.comm(r);
    test::set_combine_rows(args, out[r], data[r], shape.hidden, K);
    args.topk_weights = out[r].recv_topk_weights.data();
    kernels::add_intranode_combine(launch, args);
  });
  // Reference: acc = 0 + (0 + row_d0 + row_d1 + ...), d ascending, one cast
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < data[s].num_tokens; ++t) {
      std::vector<std::pair<int, int>> const rows = test::received_rows_of(expected, s, t);  // (rank d, row on d)
      for (int j = 0; j < shape.hidden; ++j) {
        float partial = 0.0f;
        for (auto [d, m] : rows) partial = partial + ref_bf16_to_float(out[d].expert_out[size_t(m) * shape.hidden + j]);
        float acc = 0.0f;
        acc = acc + partial;
        test::check_combined_element(out[s].combined_x[size_t(t) * shape.hidden + j], test::ref_float_to_bf16(acc), s,
                                     t, j);
      }
      for (int k = 0; k < K; ++k) {
        float partial = 0.0f;
        for (auto [d, m] : rows) partial = partial + out[d].recv_topk_weights[size_t(m) * K + k];
        float acc = 0.0f;
        acc = acc + partial;
        float const got = out[s].combined_topk_weights[size_t(t) * K + k];
        CHECK_EQ(std::bit_cast<uint32_t>(got), std::bit_cast<uint32_t>(acc));
      }
    }
  }
}

void run_shape(Shape const& shape, std::optional<uint64_t> fuzz_seed = std::nullopt) {
  Cluster cluster(shape, fuzz_seed);
  for (int round = 0; round < shape.rounds; ++round) run_round(cluster, shape.seed * 100 + round);
}

int const kTokens = test::kSanitized ? 24 : 96;

EPCOMM_TEST(intranode_dispatch_combine_2_ranks) {
  // R=2: C in {1, 2, 4}, bf16 and FP8, tiny rings that wrap many times
  run_shape({2, 1, 4, 2, token_counts(2, kTokens, 1), 64, false, 4, 3, 1, 2, 11});
  run_shape({2, 2, 4, 1, token_counts(2, kTokens, 2), 128, true, 2, 2, 4, 1, 12});
  run_shape({2, 4, 4, 4, token_counts(2, kTokens, 3), 32, false, 3, 4, 1, 1, 13});
  // 68-byte rows: 4-byte aligned, not 16 (the copies take the vector path for some rows, words for the
  // others, and a word tail after the vectors)
  run_shape({2, 2, 4, 2, token_counts(2, kTokens, 14), 34, false, 4, 3, 1, 1, 14});
}

EPCOMM_TEST(intranode_dispatch_combine_4_ranks) {
  run_shape({4, 1, 4, 2, token_counts(4, kTokens, 4), 128, true, 4, 3, 2, 1, 21});
  run_shape({4, 2, 8, 3, token_counts(4, kTokens, 5), 64, false, 6, 2, 1, 2, 22});
  if (!test::kSanitized) run_shape({4, 4, 4, 1, token_counts(4, 3 * kTokens, 6), 256, true, 8, 4, 1, 1, 23});
}

EPCOMM_TEST(intranode_dispatch_combine_8_ranks) {
  run_shape({8, 1, 4, 2, token_counts(8, kTokens, 7), 64, false, 4, 2, 1, 1, 31});
  if (!test::kSanitized) {
    run_shape({8, 2, 6, 4, token_counts(8, kTokens, 8), 128, true, 8, 3, 4, 2, 32});
    run_shape({8, 4, 4, 2, token_counts(8, 2 * kTokens, 9), 64, false, 4, 2, 1, 1, 33});
  }
}

EPCOMM_TEST(intranode_fuzzed_schedules) {
  int const num_seeds = 10;
  for (uint64_t seed = 1; seed <= num_seeds; ++seed) {
    run_shape({2, 2, 4, 2, token_counts(2, 16, seed), 64, seed % 2 == 0, 4, 2, 1, 1, 40 + seed}, seed);
    run_shape({4, 1, 4, 3, token_counts(4, 12, seed + 50), 128, seed % 2 == 1, 3, 2, 1, 1, 60 + seed}, seed);
  }
}

EPCOMM_TEST(intranode_call_check) {
  for (int num_ranks : {2, 4}) {
    Cluster cluster({num_ranks, 1, 4, 2, std::vector<int>(size_t(num_ranks), 0), 64, false}, std::nullopt);
    test::check_call_verdicts(num_ranks, [&](auto const& flags, auto const& digests) {
      return run_call_check(cluster, flags, digests);
    });
  }
}

// A dispatch gated by a call check that rank 2 refused (call_check.cuh): every rank's grid returns at once and
// reports call_rejected naming rank 2 and its flags, no abort flag goes up, nothing is written, and the next
// round on the same buffers runs as usual.
EPCOMM_TEST(intranode_rejected_call_moves_nothing) {
  Shape shape{4, 2, 4, 2, token_counts(4, 16, 9), 64, false, 4, 2, 1, 1, 91};
  int const R = shape.num_ranks;
  Cluster cluster(shape, std::nullopt);
  run_round(cluster, 3);
  std::vector<RankTokens> data = make_inputs(shape, 4);
  std::vector<test::NormalRankBuffers> out(static_cast<size_t>(R));
  notify_counts(cluster, data, out, 4);
  std::vector<std::array<int32_t, 3>> verdicts(static_cast<size_t>(R), {-1, -1, -1});
  cluster.run_on_every_rank("notify_call_check", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    args.call_digest = 77;
    args.call_flags = r == 2 ? kernels::kCallRefused : 0;
    args.call_agreed = &verdicts[size_t(r)][0];
    args.call_mismatch = &verdicts[size_t(r)][1];
    kernels::add_notify(launch, args);
  });
  for (int r = 0; r < R; ++r) CHECK((verdicts[size_t(r)] == std::array<int32_t, 3>{0, 2, kernels::kCallRefused}));
  simt::ConcurrentLaunch launch(cluster.options("dispatch_rejected"));
  for (int r = 0; r < R; ++r) {
    kernels::IntranodeDispatchArgs args;
    args.comm = cluster.comm(r);
    test::set_dispatch_rows(args, out[size_t(r)], data[size_t(r)], shape.dispatch_shape(), R * shape.num_local_experts);
    args.call_verdict = verdicts[size_t(r)].data();
    kernels::add_intranode_dispatch(launch, args);
  }
  CHECK(launch.try_run().ok());
  for (int r = 0; r < R; ++r) {
    CHECK_CONTAINS(error_text(cluster.errors[size_t(r)]), "intranode_dispatch call_rejected: rank=" + std::to_string(r) +
                                                               " role=call_gate channel=-1 peer=2 expected=0 observed=1");
    CHECK(std::all_of(out[size_t(r)].recv_x.begin(), out[size_t(r)].recv_x.end(), [](uint8_t b) { return b == 0xee; }));
    CHECK_EQ(*cluster.workspace.abort_flag(cluster.peer_buffers[size_t(r)]), 0);
    cluster.errors[size_t(r)] = kernels::ErrorSlot{};
  }
  run_round(cluster, 5);
}

// A dispatch counted on the device (recv_capacity: num_worst_tokens, the host never read the count) into
// outputs too small on rank 1: its kernel reports recv_overflow with the rows held and received, writes no
// row past its outputs and raises the abort flag (no host saw the count: the other ranks learn it so); no
// grid hangs, and every other rank either finished or stopped with peer_aborted.
EPCOMM_TEST(intranode_dispatch_past_its_capacity_writes_nothing_beyond_and_reports) {
  Shape shape{4, 2, 4, 2, token_counts(4, 16, 9), 64, false, 4, 2, 1, 1, 93};
  int const R = shape.num_ranks;
  Cluster cluster(shape, std::nullopt);
  std::vector<RankTokens> data = make_inputs(shape, 6);
  std::vector<test::NormalRankBuffers> out(static_cast<size_t>(R));
  notify_counts(cluster, data, out, 6);
  int const received = out[1].num_received(), capacity = received - 3;
  CHECK(capacity >= 1);
  int const row_bytes = shape.dispatch_shape().hidden_bytes;
  simt::ConcurrentLaunch launch(cluster.options("dispatch_overflow"));
  for (int r = 0; r < R; ++r) {
    kernels::IntranodeDispatchArgs args;
    args.comm = cluster.comm(r);
    test::set_dispatch_rows(args, out[size_t(r)], data[size_t(r)], shape.dispatch_shape(), R * shape.num_local_experts);
    args.recv_capacity = r == 1 ? capacity : out[size_t(r)].num_received();
    kernels::add_intranode_dispatch(launch, args);
  }
  CHECK(launch.try_run().ok());
  CHECK_CONTAINS(error_text(cluster.errors[1]), "intranode_dispatch recv_overflow: rank=1 role=dispatch_receiver channel=-1 "
                                                "peer=-1 expected=" + std::to_string(capacity) +
                                                    " observed=" + std::to_string(received));
  std::vector<uint8_t> const& rows = out[1].recv_x;
  CHECK(std::all_of(rows.begin() + int64_t(capacity) * row_bytes, rows.end(), [](uint8_t b) { return b == 0xee; }));
  CHECK(std::all_of(out[1].recv_src_idx.begin() + capacity, out[1].recv_src_idx.end(), [](int32_t i) { return i == -7; }));
  for (int r = 0; r < R; ++r) {
    CHECK_EQ(*cluster.workspace.abort_flag(cluster.peer_buffers[size_t(r)]), 1);
    if (r != 1)
      CHECK(cluster.errors[size_t(r)].code == 0 ||
            cluster.errors[size_t(r)].code == int32_t(kernels::ErrorCode::kPeerAborted));
  }
}

// A rank that never launches: its peers' waits time out and name it.
EPCOMM_TEST(intranode_timeout_names_the_missing_peer) {
  Shape shape{2, 1, 4, 2, {8, 8}, 64, false, 2, 2, 1, 1, 77};
  Cluster cluster(shape, std::nullopt);
  std::vector<RankTokens> data = make_inputs(shape, 5);
  kernels::NotifyArgs args;
  args.comm = cluster.comm(0);
  CHECK_CONTAINS(cluster.run_alone_until_timeout("notify_missing_rank", args, kernels::add_notify),
                 "notify timeout: rank=0 role=notify_barrier channel=-1 peer=1 expected=1 observed=0");
  CHECK_EQ(*cluster.workspace.abort_flag(cluster.peer_buffers[1]), 1);  // the alarm reached the peer
}

// A CUDA graph replays a notify with the arguments it was captured with: the epoch is counted on the
// device, so each replay is a new barrier (and call check) rather than one that stale signals pass.
// The same arguments run on every rank three times, then on rank 0 alone: that one waits for its
// peer's fourth signal and times out naming it.
EPCOMM_TEST(intranode_notify_replayed_with_its_arguments_is_a_new_barrier_each_time) {
  Shape shape{2, 1, 4, 2, {8, 8}, 64, false, 2, 2, 1, 1, 79};
  Cluster cluster(shape, std::nullopt);
  std::vector<int32_t> agreed(2, -1);
  std::vector<kernels::NotifyArgs> captured(2);
  for (int r = 0; r < 2; ++r) {
    captured[size_t(r)].comm = cluster.comm(r);
    captured[size_t(r)].call_digest = 0x7e91a1;
    captured[size_t(r)].call_flags = 0;
    captured[size_t(r)].call_agreed = &agreed[size_t(r)];
  }
  for (int64_t replay = 1; replay <= 3; ++replay) {
    agreed.assign(2, -1);
    cluster.run_on_every_rank("notify_replay", [&](simt::ConcurrentLaunch& launch, int r) {
      kernels::add_notify(launch, captured[size_t(r)]);
    });
    for (int r = 0; r < 2; ++r) {
      CHECK_EQ(agreed[size_t(r)], 1);
      CHECK_EQ(*cluster.workspace.epoch_counter(cluster.peer_buffers[size_t(r)]), replay);
    }
  }
  CHECK_CONTAINS(cluster.run_alone_until_timeout("notify_replay_missing_rank", captured[0], kernels::add_notify),
                 "notify timeout: rank=0 role=notify_barrier channel=-1 peer=1 expected=4 observed=3");
}

EPCOMM_TEST(intranode_workspace_and_validation) {
  kernels::KernelConfig config{2, 4, 8};
  CHECK(kernels::validate_config(config, 8) == nullptr);
  CHECK(kernels::validate_config({2, 9, 8}, 8) != nullptr);
  CHECK(kernels::validate_config(config, 33) != nullptr);
  kernels::NvlWorkspace ws({8, 4, 8, 7168 * 2}, config);
  // regions are disjoint, in order and aligned
  CHECK(ws.abort_flag_offset < ws.barrier_signal_offset && ws.barrier_signal_offset < ws.epoch_counter_offset &&
        ws.epoch_counter_offset < ws.channel_counts_offset &&
        ws.channel_counts_offset < ws.expert_counts_offset && ws.expert_counts_offset < ws.call_headers_offset &&
        ws.call_headers_offset < ws.ring_head_offset &&
        ws.ring_head_offset < ws.ring_tail_offset && ws.ring_tail_offset < ws.ring_slots_offset);
  CHECK_EQ(ws.ring_slots_offset % 128, size_t(0));
  CHECK_EQ(ws.slot_bytes, kernels::align_up(7168 * 2 + 8 + 8 * 12, 16));
  CHECK_EQ(ws.required_bytes(), ws.ring_slots_offset + ws.slot_bytes * 8 * 8 * 2);
  kernels::IntranodeDispatchArgs args;
  args.comm.config = config;
  args.comm.num_ranks = 8;
  args.comm.workspace = ws;
  CHECK(std::string(kernels::validate(args)).find("peer_buffers") != std::string::npos);
  // a call check needs its output and known flags
  kernels::NotifyArgs notify;
  notify.call_flags = kernels::kNoCallCheck;
  CHECK(kernels::validate_call_check(notify) == nullptr);
  notify.call_flags = 0;
  CHECK_CONTAINS(std::string(kernels::validate_call_check(notify)), "needs call_agreed");
  int32_t agreed = -1;
  notify.call_agreed = &agreed;
  CHECK(kernels::validate_call_check(notify) == nullptr);
  notify.call_flags = 4;
  CHECK_CONTAINS(std::string(kernels::validate_call_check(notify)), "call_flags must be");
}

}  // namespace

namespace {

// Every fp16 value survives fp16 -> fp32 -> fp16 (NaNs become the quiet 0x7e00 of their sign), and
// fp32 -> fp16 rounds to nearest even at the subnormal, normal and overflow boundaries.
EPCOMM_TEST(element_conversions) {
  for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
    uint16_t const half = uint16_t(bits);
    bool const is_nan = (half & 0x7c00u) == 0x7c00u && (half & 0x3ffu) != 0;
    uint16_t const want = is_nan ? uint16_t((half & 0x8000u) | 0x7e00u) : half;
    CHECK_EQ(kernels::float_to_fp16_bits(kernels::fp16_bits_to_float(half)), want);
  }
  CHECK_EQ(kernels::float_to_fp16_bits(65504.0f), uint16_t(0x7bff));
  CHECK_EQ(kernels::float_to_fp16_bits(65519.99f), uint16_t(0x7bff));
  CHECK_EQ(kernels::float_to_fp16_bits(65520.0f), uint16_t(0x7c00));          // halfway, rounds to even: inf
  CHECK_EQ(kernels::float_to_fp16_bits(-1e9f), uint16_t(0xfc00));
  CHECK_EQ(kernels::float_to_fp16_bits(0x1p-25f), uint16_t(0x0000));          // half the smallest subnormal: even
  CHECK_EQ(kernels::float_to_fp16_bits(0x1.8p-24f), uint16_t(0x0002));        // 1.5 steps: to even (2)
  CHECK_EQ(kernels::float_to_fp16_bits(1.0f + 0x1p-11f), uint16_t(0x3c00));   // halfway above 1: to even
  CHECK_EQ(kernels::float_to_fp16_bits(1.0f + 0x1.8p-10f), uint16_t(0x3c02)); // 1.5 ulp: to even
  CHECK_EQ(kernels::float_to_fp16_bits(0x1.ffcp-15f), uint16_t(0x0400));      // rounds up into the normals
  CHECK_EQ(kernels::float_to_bf16_bits(1.0f + 0x1p-8f), uint16_t(0x3f80));    // bf16 halfway: to even
  CHECK_EQ(kernels::load_element(std::array<float, 2>{1.5f, -2.0f}.data(), 1, kernels::ElementKind::kFloat32), -2.0f);
}

}  // namespace
