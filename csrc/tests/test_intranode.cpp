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
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/intranode.hpp"
#include "../kernels/intranode_validate.hpp"
#include "harness.hpp"
#include "test_common.hpp"

using namespace epcomm;
using kernels::ErrorSlot;
using test::AlignedBuffer;
using test::error_text;
using test::kernel_timeout_cycles;
using test::ref_bf16_to_float;
using test::ref_float_to_bf16;

namespace {

// ---- host reference ---------------------------------------------------------

struct Shape {
  int num_ranks, num_channels, ring_tokens, chunk_tokens;
  std::vector<int> num_tokens;  // per rank
  int hidden;                   // elements; dispatch row = hidden bytes (fp8) or 2 * hidden (bf16)
  bool fp8;
  int num_topk = 4, num_local_experts = 3, expert_alignment = 1, rounds = 1;
  uint64_t seed = 1;
};

struct RankData {
  int num_tokens = 0;
  std::vector<uint8_t> x, x_scales;     // [N, hidden_bytes], [N, scale_bytes]
  std::vector<int64_t> topk_idx;        // [N, K]
  std::vector<float> topk_weights;      // [N, K]
};

struct Expected {  // what one rank receives
  std::vector<uint8_t> recv_x, recv_x_scales;
  std::vector<int64_t> recv_topk_idx;
  std::vector<float> recv_topk_weights;
  std::vector<int32_t> recv_src_idx, recv_src_rank;
  std::vector<int32_t> num_recv_tokens_per_expert;
};

int hidden_bytes_of(Shape const& shape) { return shape.fp8 ? shape.hidden : 2 * shape.hidden; }
int scale_bytes_of(Shape const& shape) { return shape.fp8 ? 4 * (shape.hidden / 128) : 0; }

std::vector<RankData> make_inputs(Shape const& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  int const num_experts = shape.num_ranks * shape.num_local_experts;
  std::vector<RankData> data(shape.num_ranks);
  for (int r = 0; r < shape.num_ranks; ++r) {
    RankData& d = data[r];
    d.num_tokens = shape.num_tokens[r];
    d.x.resize(size_t(d.num_tokens) * hidden_bytes_of(shape));
    d.x_scales.resize(size_t(d.num_tokens) * scale_bytes_of(shape));
    for (auto& b : d.x) b = uint8_t(rng());
    for (auto& b : d.x_scales) b = uint8_t(rng());
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

bool token_goes_to(Shape const& shape, RankData const& d, int t, int rank) {
  for (int k = 0; k < shape.num_topk; ++k) {
    int64_t e = d.topk_idx[size_t(t) * shape.num_topk + k];
    if (e >= 0 && e / shape.num_local_experts == rank) return true;
  }
  return false;
}

Expected expected_dispatch(Shape const& shape, std::vector<RankData> const& data, int rank) {
  Expected out;
  int const hb = hidden_bytes_of(shape), sb = scale_bytes_of(shape), K = shape.num_topk;
  out.num_recv_tokens_per_expert.assign(shape.num_local_experts, 0);
  for (int s = 0; s < shape.num_ranks; ++s) {
    RankData const& d = data[s];
    for (int t = 0; t < d.num_tokens; ++t) {
      if (!token_goes_to(shape, d, t, rank)) continue;
      out.recv_x.insert(out.recv_x.end(), d.x.begin() + size_t(t) * hb, d.x.begin() + size_t(t + 1) * hb);
      out.recv_x_scales.insert(out.recv_x_scales.end(), d.x_scales.begin() + size_t(t) * sb,
                               d.x_scales.begin() + size_t(t + 1) * sb);
      out.recv_src_idx.push_back(t);
      out.recv_src_rank.push_back(s);
      for (int k = 0; k < K; ++k) {
        int64_t e = d.topk_idx[size_t(t) * K + k];
        bool local = e >= 0 && e / shape.num_local_experts == rank;
        out.recv_topk_idx.push_back(local ? e - int64_t(rank) * shape.num_local_experts : -1);
        out.recv_topk_weights.push_back(local ? d.topk_weights[size_t(t) * K + k] : 0.0f);
        if (local) ++out.num_recv_tokens_per_expert[e - int64_t(rank) * shape.num_local_experts];
      }
    }
  }
  for (int32_t& count : out.num_recv_tokens_per_expert)
    count = (count + shape.expert_alignment - 1) / shape.expert_alignment * shape.expert_alignment;
  return out;
}

// ---- device-side state of all ranks ----------------------------------------

struct Cluster {
  Shape shape;
  kernels::KernelConfig config;
  kernels::NvlWorkspace workspace;
  std::vector<std::unique_ptr<AlignedBuffer>> buffers;
  std::vector<void*> peer_buffers;
  std::vector<ErrorSlot> errors;
  std::optional<uint64_t> fuzz_seed;
  int64_t epoch = 0;

  Cluster(Shape const& s, std::optional<uint64_t> seed) : shape(s), fuzz_seed(seed) {
    config = {s.num_channels, s.chunk_tokens, s.ring_tokens};
    int const max_row_bytes = std::max(hidden_bytes_of(s) + scale_bytes_of(s), 2 * s.hidden);
    workspace = kernels::NvlWorkspace({s.num_ranks, s.num_local_experts, s.num_topk, max_row_bytes}, config);
    for (int r = 0; r < s.num_ranks; ++r) {
      buffers.push_back(std::make_unique<AlignedBuffer>(workspace.required_bytes()));
      peer_buffers.push_back(buffers.back()->ptr);
    }
    errors.assign(s.num_ranks, ErrorSlot{});
  }

  kernels::CommArgs comm(int rank) {
    kernels::CommArgs c;
    c.rank = rank;
    c.num_ranks = shape.num_ranks;
    c.config = config;
    c.workspace = workspace;
    c.peer_buffers = peer_buffers.data();
    c.error = &errors[rank];
    c.timeout_cycles = kernel_timeout_cycles();
    return c;
  }

  simt::LaunchOptions options(char const* name) {
    simt::LaunchOptions o = kernels::default_launch_options(name, kernel_timeout_cycles());
    o.fuzz_seed = fuzz_seed;
    return o;
  }

  // Runs the launch; a failed launch or a filled error slot fails the test with the slot's text.
  void run(simt::ConcurrentLaunch const& launch) {
    simt::LaunchStatus status = launch.try_run();
    std::string problems;
    for (ErrorSlot const& slot : errors)
      if (slot.code != 0) problems += "  kernel error: " + error_text(slot) + "\n";
    if (!status.ok()) problems += std::string("  launch failed: ") + status.message + "\n";
    if (!problems.empty()) throw test::CheckFailure("intranode launch failed:\n" + problems);
  }
};

struct RankOutputs {
  std::vector<int32_t> num_tokens_per_rank, num_tokens_per_expert;
  std::vector<uint8_t> is_token_in_rank;  // bool storage
  std::vector<int32_t> recv_rank_prefix, recv_channel_prefix, num_recv_tokens_per_expert;
  std::vector<uint8_t> recv_x, recv_x_scales;
  std::vector<int64_t> recv_topk_idx;
  std::vector<float> recv_topk_weights;
  std::vector<int32_t> recv_src_idx;
  std::vector<uint16_t> expert_out, combined_x;
  std::vector<float> combined_topk_weights;
  int32_t call_agreed = -1;
};

void run_layout(Shape const& shape, RankData const& d, RankOutputs& out) {
  int const num_experts = shape.num_ranks * shape.num_local_experts;
  out.num_tokens_per_rank.assign(shape.num_ranks, -1);
  out.num_tokens_per_expert.assign(num_experts, -1);
  out.is_token_in_rank.assign(size_t(d.num_tokens) * shape.num_ranks, 2);
  kernels::LayoutArgs args;
  args.topk_idx = d.topk_idx.data();
  args.num_tokens = d.num_tokens;
  args.num_topk = shape.num_topk;
  args.num_experts = num_experts;
  args.num_ranks = shape.num_ranks;
  args.num_tokens_per_rank = out.num_tokens_per_rank.data();
  args.num_tokens_per_expert = out.num_tokens_per_expert.data();
  args.is_token_in_rank = reinterpret_cast<bool*>(out.is_token_in_rank.data());
  kernels::launch_get_dispatch_layout(args, kernels::default_launch_options("layout", kernel_timeout_cycles()))
      .throw_if_failed();
  // Check against the definition
  std::vector<int32_t> per_rank(shape.num_ranks, 0), per_expert(num_experts, 0);
  for (int t = 0; t < d.num_tokens; ++t) {
    for (int k = 0; k < shape.num_topk; ++k) {
      int64_t e = d.topk_idx[size_t(t) * shape.num_topk + k];
      if (e >= 0) ++per_expert[e];
    }
    for (int r = 0; r < shape.num_ranks; ++r) {
      bool in = token_goes_to(shape, d, t, r);
      per_rank[r] += in;
      CHECK_EQ(int(out.is_token_in_rank[size_t(t) * shape.num_ranks + r]), int(in));
    }
  }
  CHECK(out.num_tokens_per_rank == per_rank);
  CHECK(out.num_tokens_per_expert == per_expert);
}

void add_barrier(Cluster& cluster, simt::ConcurrentLaunch& launch) {
  ++cluster.epoch;
  for (int r = 0; r < cluster.shape.num_ranks; ++r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    args.epoch = cluster.epoch;
    kernels::add_notify(launch, args);
  }
}

// One notify per rank with the given call-check fields; each rank's call_agreed (-1: not written).
std::vector<int32_t> run_call_check(Cluster& cluster, std::vector<int> const& flags, std::vector<int64_t> const& digests) {
  simt::ConcurrentLaunch launch(cluster.options("notify_call_check"));
  ++cluster.epoch;
  std::vector<int32_t> agreed(size_t(cluster.shape.num_ranks), -1);
  for (int r = 0; r < cluster.shape.num_ranks; ++r) {
    kernels::NotifyArgs args;
    args.comm = cluster.comm(r);
    args.epoch = cluster.epoch;
    args.call_digest = digests[size_t(r)];
    args.call_flags = flags[size_t(r)];
    args.call_agreed = args.call_flags == kernels::kNoCallCheck ? nullptr : &agreed[size_t(r)];
    kernels::add_notify(launch, args);
  }
  cluster.run(launch);
  return agreed;
}

// One dispatch + combine round on `cluster`, checked against the reference.
void run_round(Cluster& cluster, uint64_t data_seed) {
  Shape const& shape = cluster.shape;
  int const R = shape.num_ranks, C = shape.num_channels, K = shape.num_topk;
  int const hb = hidden_bytes_of(shape), sb = scale_bytes_of(shape);
  int const num_experts = R * shape.num_local_experts;
  std::vector<RankData> data = make_inputs(shape, data_seed);
  std::vector<RankOutputs> out(R);
  for (int r = 0; r < R; ++r) run_layout(shape, data[r], out[r]);

  // notify: counts, barrier, prefix matrices
  {
    simt::ConcurrentLaunch launch(cluster.options("notify"));
    ++cluster.epoch;
    for (int r = 0; r < R; ++r) {
      out[r].recv_rank_prefix.assign(R + 1, -1);
      out[r].recv_channel_prefix.assign(size_t(R) * (C + 1), -1);
      out[r].num_recv_tokens_per_expert.assign(shape.num_local_experts, -1);
      kernels::NotifyArgs args;
      args.comm = cluster.comm(r);
      args.epoch = cluster.epoch;
      args.exchange_counts = true;
      args.is_token_in_rank = reinterpret_cast<bool const*>(out[r].is_token_in_rank.data());
      args.num_tokens_per_expert = out[r].num_tokens_per_expert.data();
      args.num_tokens = data[r].num_tokens;
      args.expert_alignment = shape.expert_alignment;
      args.recv_rank_prefix = out[r].recv_rank_prefix.data();
      args.recv_channel_prefix_matrix = out[r].recv_channel_prefix.data();
      args.num_recv_tokens_per_expert = out[r].num_recv_tokens_per_expert.data();
      args.call_digest = int64_t(data_seed);  // the counts carry a call check too
      args.call_flags = 0;
      args.call_agreed = &out[r].call_agreed;
      kernels::add_notify(launch, args);
    }
    cluster.run(launch);
  }
  for (int r = 0; r < R; ++r) CHECK_EQ(out[r].call_agreed, 1);
  std::vector<Expected> expected;
  for (int r = 0; r < R; ++r) {
    expected.push_back(expected_dispatch(shape, data, r));
    Expected const& e = expected[r];
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
  {
    simt::ConcurrentLaunch launch(cluster.options("dispatch"));
    for (int r = 0; r < R; ++r) {
      RankOutputs& o = out[r];
      int const M = o.recv_rank_prefix[R];
      o.recv_x.assign(size_t(M) * hb, 0xee);
      o.recv_x_scales.assign(size_t(M) * sb, 0xee);
      o.recv_topk_idx.assign(size_t(M) * K, -7);
      o.recv_topk_weights.assign(size_t(M) * K, -7.0f);
      o.recv_src_idx.assign(M, -7);
      kernels::IntranodeDispatchArgs args;
      args.comm = cluster.comm(r);
      args.x = data[r].x.data();
      args.hidden_bytes = hb;
      args.x_scales = sb ? data[r].x_scales.data() : nullptr;
      args.scale_bytes = sb;
      args.topk_idx = data[r].topk_idx.data();
      args.topk_weights = data[r].topk_weights.data();
      args.num_topk = K;
      args.num_experts = num_experts;
      args.num_tokens = data[r].num_tokens;
      args.is_token_in_rank = reinterpret_cast<bool const*>(o.is_token_in_rank.data());
      args.recv_channel_prefix_matrix = o.recv_channel_prefix.data();
      args.recv_x = o.recv_x.data();
      args.recv_x_scales = sb ? o.recv_x_scales.data() : nullptr;
      args.recv_topk_idx = o.recv_topk_idx.data();
      args.recv_topk_weights = o.recv_topk_weights.data();
      args.recv_src_idx = o.recv_src_idx.data();
      kernels::add_intranode_dispatch(launch, args);
    }
    cluster.run(launch);
  }
  for (int r = 0; r < R; ++r) {
    CHECK(out[r].recv_src_idx == expected[r].recv_src_idx);
    CHECK(out[r].recv_x == expected[r].recv_x);
    CHECK(out[r].recv_x_scales == expected[r].recv_x_scales);
    for (size_t i = 0; i < out[r].recv_topk_idx.size(); ++i)
      if (out[r].recv_topk_idx[i] != expected[r].recv_topk_idx[i])
        throw test::CheckFailure("recv_topk_idx mismatch: rank " + std::to_string(r) + " entry " + std::to_string(i) +
                                 ": " + std::to_string(out[r].recv_topk_idx[i]) + " != " +
                                 std::to_string(expected[r].recv_topk_idx[i]));
    CHECK(out[r].recv_topk_idx == expected[r].recv_topk_idx);
    CHECK(std::memcmp(out[r].recv_topk_weights.data(), expected[r].recv_topk_weights.data(),
                      out[r].recv_topk_weights.size() * 4) == 0);
  }

  // expert outputs: random bf16 rows; some rows all -0.0 (the sum must start at +0.0)
  std::mt19937_64 rng(data_seed * 7919 + 1);
  for (int r = 0; r < R; ++r) {
    int const M = out[r].recv_rank_prefix[R];
    out[r].expert_out.resize(size_t(M) * shape.hidden);
    for (int m = 0; m < M; ++m) {
      bool const negative_zero_row = rng() % 8 == 0;
      for (int j = 0; j < shape.hidden; ++j) {
        // exponents far apart, so that a different summation order changes the rounded result
        float const magnitude = std::ldexp(1.0f + float(rng() % 128) / 128.0f, int(rng() % 48) - 24);
        float const value = negative_zero_row ? -0.0f : (rng() % 2 ? magnitude : -magnitude);
        out[r].expert_out[size_t(m) * shape.hidden + j] = uint16_t(std::bit_cast<uint32_t>(value) >> 16);
      }
    }
  }

  // barrier (resets the rings), then combine
  {
    simt::ConcurrentLaunch launch(cluster.options("combine_barrier"));
    add_barrier(cluster, launch);
    cluster.run(launch);
  }
  {
    simt::ConcurrentLaunch launch(cluster.options("combine"));
    for (int r = 0; r < R; ++r) {
      RankOutputs& o = out[r];
      o.combined_x.assign(size_t(data[r].num_tokens) * shape.hidden, 0xeeee);
      o.combined_topk_weights.assign(size_t(data[r].num_tokens) * K, -7.0f);
      kernels::IntranodeCombineArgs args;
      args.comm = cluster.comm(r);
      args.x = o.expert_out.data();
      args.topk_weights = o.recv_topk_weights.data();
      args.hidden = shape.hidden;
      args.num_topk = K;
      args.num_tokens = data[r].num_tokens;
      args.is_token_in_rank = reinterpret_cast<bool const*>(o.is_token_in_rank.data());
      args.recv_channel_prefix_matrix = o.recv_channel_prefix.data();
      args.combined_x = o.combined_x.data();
      args.combined_topk_weights = o.combined_topk_weights.data();
      kernels::add_intranode_combine(launch, args);
    }
    cluster.run(launch);
  }
  // Reference: acc = 0 + (0 + row_d0 + row_d1 + ...), d ascending, one cast
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < data[s].num_tokens; ++t) {
      std::vector<std::pair<int, int>> rows;  // (rank d, row on d)
      for (int d = 0; d < R; ++d)
        for (size_t m = 0; m < expected[d].recv_src_idx.size(); ++m)
          if (expected[d].recv_src_rank[m] == s && expected[d].recv_src_idx[m] == t) rows.push_back({d, int(m)});
      for (int j = 0; j < shape.hidden; ++j) {
        float partial = 0.0f;
        for (auto [d, m] : rows) partial = partial + ref_bf16_to_float(out[d].expert_out[size_t(m) * shape.hidden + j]);
        float acc = 0.0f;
        acc = acc + partial;
        uint16_t const want = ref_float_to_bf16(acc);
        uint16_t const got = out[s].combined_x[size_t(t) * shape.hidden + j];
        if (want != got)
          throw test::CheckFailure("combine mismatch: rank " + std::to_string(s) + " token " + std::to_string(t) +
                                   " element " + std::to_string(j) + ": " + std::to_string(got) +
                                   " != " + std::to_string(want));
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

std::vector<int> token_counts(int num_ranks, int base, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> counts(num_ranks);
  for (int r = 0; r < num_ranks; ++r) counts[r] = base / 2 + int(rng() % uint64_t(base + 1));
  counts[num_ranks / 2] = 0;  // a rank with no tokens
  return counts;
}

int const kTokens = test::kSanitized ? 24 : 96;

EPCOMM_TEST(intranode_dispatch_combine_2_ranks) {
  // R=2: C in {1, 2, 4}, bf16 and FP8, tiny rings that wrap many times
  run_shape({2, 1, 4, 2, token_counts(2, kTokens, 1), 64, false, 4, 3, 1, 2, 11});
  run_shape({2, 2, 4, 1, token_counts(2, kTokens, 2), 128, true, 2, 2, 4, 1, 12});
  run_shape({2, 4, 4, 4, token_counts(2, kTokens, 3), 32, false, 3, 4, 1, 1, 13});
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

// A rank that never launches: its peers' waits time out and name it.
EPCOMM_TEST(intranode_timeout_names_the_missing_peer) {
  Shape shape{2, 1, 4, 2, {8, 8}, 64, false, 2, 2, 1, 1, 77};
  Cluster cluster(shape, std::nullopt);
  std::vector<RankData> data = make_inputs(shape, 5);
  simt::ConcurrentLaunch launch(cluster.options("notify_missing_rank"));
  kernels::NotifyArgs args;
  args.comm = cluster.comm(0);
  args.comm.timeout_cycles = 50'000'000;  // 50 ms
  args.epoch = 1;
  kernels::add_notify(launch, args);
  simt::LaunchStatus status = launch.try_run();
  CHECK(status.ok());  // the kernel left by itself
  CHECK_EQ(cluster.errors[0].code, int32_t(kernels::ErrorCode::kTimeout));
  CHECK_CONTAINS(error_text(cluster.errors[0]), "notify timeout: rank=0 role=notify_barrier channel=-1 peer=1 expected=1 observed=0");
  CHECK_EQ(*cluster.workspace.abort_flag(cluster.peer_buffers[1]), 1);  // the alarm reached the peer
}

EPCOMM_TEST(intranode_workspace_and_validation) {
  kernels::KernelConfig config{2, 4, 8};
  CHECK(kernels::validate_config(config, 8) == nullptr);
  CHECK(kernels::validate_config({2, 9, 8}, 8) != nullptr);
  CHECK(kernels::validate_config(config, 33) != nullptr);
  kernels::NvlWorkspace ws({8, 4, 8, 7168 * 2}, config);
  // regions are disjoint, in order and aligned
  CHECK(ws.abort_flag_offset < ws.barrier_signal_offset && ws.barrier_signal_offset < ws.channel_counts_offset &&
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
  notify.epoch = 1;
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
