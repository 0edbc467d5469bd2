#pragma once
// The inputs of a gpu-check round and what the host expects back, written from the library's contract
// (reference.py), never from the kernels. Dispatch: tests/dispatch_reference.hpp (shared with the kernel
// tests). Combine: every source token's sum over the rows it was received as, which this file indexes
// once so that 8 ranks x 4096 tokens x hidden 7168 stay a few seconds of host work.
//
//   combined[t] = bf16(0 + P_0 + P_1 + ...) over the nodes holding t, ascending; P_n = 0 + row_d + ...
//   over the ranks d of node n holding t, ascending, in fp32, rounded to bf16 when node partials travel
//   in bf16 (internode). One node (intranode) is the same formula with a single P.
//   Weights likewise, never rounded.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../dispatch_reference.hpp"
#include "../test_common.hpp"

namespace epcomm::gpu_check {

// What one round dispatches: R ranks of num_nvl_ranks per node, the same token count on every rank.
struct Problem {
  int num_ranks = 8, num_nvl_ranks = 8;
  int num_tokens = 0;  // per rank
  int hidden = 7168;
  bool fp8 = false;
  int num_topk = 8, num_experts = 256;
  uint64_t seed = 1;

  int num_local_experts() const { return num_experts / num_ranks; }
  int hidden_bytes() const { return test::row_hidden_bytes(hidden, fp8); }
  int scale_bytes() const { return test::row_scale_bytes(hidden, fp8); }
  test::DispatchShape dispatch_shape() const { return {num_local_experts(), num_topk, hidden_bytes(), scale_bytes()}; }
  std::string describe() const {
    return std::to_string(num_ranks) + " ranks x " + std::to_string(num_tokens) + " tokens, hidden " +
           std::to_string(hidden) + (fp8 ? " fp8" : " bf16") + ", top-" + std::to_string(num_topk) + " of " +
           std::to_string(num_experts);
  }
};

// Every rank's tokens: random row bytes (dispatch moves them opaquely), top-k of distinct experts drawn
// uniformly (DeepSeek-V3's shape: top-8 of 256), about one entry in ten -1.
inline std::vector<test::RankTokens> make_tokens(Problem const& problem) {
  std::vector<test::RankTokens> ranks(size_t(problem.num_ranks));
  for (int r = 0; r < problem.num_ranks; ++r) {
    std::mt19937_64 rng(problem.seed * 1000003 + uint64_t(r));
    test::RankTokens& tokens = ranks[size_t(r)];
    int const N = problem.num_tokens, K = problem.num_topk;
    tokens.num_tokens = N;
    tokens.x.resize(size_t(N) * size_t(problem.hidden_bytes()));
    tokens.x_scales.resize(size_t(N) * size_t(problem.scale_bytes()));
    for (std::vector<uint8_t>* bytes : {&tokens.x, &tokens.x_scales})
      for (size_t i = 0; i < bytes->size(); i += 8) {  // eight random bytes per draw
        uint64_t const word = rng();
        std::copy_n(reinterpret_cast<uint8_t const*>(&word), std::min<size_t>(8, bytes->size() - i), bytes->data() + i);
      }
    tokens.topk_idx.assign(size_t(N) * size_t(K), -1);
    tokens.topk_weights.resize(tokens.topk_idx.size());
    for (int t = 0; t < N; ++t) {
      int64_t* row = &tokens.topk_idx[size_t(t) * size_t(K)];
      for (int k = 0; k < K; ++k) {
        int64_t expert;
        do expert = int64_t(rng() % uint64_t(problem.num_experts));
        while (std::find(row, row + k, expert) != row + k);
        row[k] = rng() % 10 == 0 ? -1 : expert;
        tokens.topk_weights[size_t(t) * size_t(K) + size_t(k)] = float(rng() % 1000) / 997.0f;
      }
    }
  }
  return ranks;
}

// Where every source token was received: (receiving rank, row), receiving ranks ascending. Built from
// each receiver's expected (source rank, source index) per row, in one pass: dispatch_reference.hpp's
// received_rows_of scans every receiver per token, which at 8 x 4096 tokens is billions of steps.
class ReceivedRows {
 public:
  // receivers[d]: what rank d receives (its recv_src_rank / recv_src_idx, row by row).
  ReceivedRows(int num_ranks, int num_tokens, std::vector<test::ExpectedReceive> const& receivers)
      : num_tokens_(num_tokens), begin_(size_t(num_ranks) * size_t(num_tokens) + 1, 0) {
    for (test::ExpectedReceive const& receiver : receivers)
      for (size_t m = 0; m < receiver.recv_src_idx.size(); ++m)
        ++begin_[key(receiver.recv_src_rank[m], receiver.recv_src_idx[m]) + 1];
    for (size_t i = 1; i < begin_.size(); ++i) begin_[i] += begin_[i - 1];
    rows_.resize(begin_.back());
    std::vector<size_t> fill(begin_.begin(), begin_.end() - 1);
    for (int d = 0; d < int(receivers.size()); ++d)
      for (size_t m = 0; m < receivers[size_t(d)].recv_src_idx.size(); ++m)
        rows_[fill[key(receivers[size_t(d)].recv_src_rank[m], receivers[size_t(d)].recv_src_idx[m])]++] = {d, int(m)};
  }

  struct Row {
    int rank, row;
  };
  Row const* begin(int source, int t) const { return rows_.data() + begin_[key(source, t)]; }
  Row const* end(int source, int t) const { return rows_.data() + begin_[key(source, t) + 1]; }

 private:
  size_t key(int source, int t) const { return size_t(source) * size_t(num_tokens_) + size_t(t); }
  int num_tokens_;
  std::vector<size_t> begin_;
  std::vector<Row> rows_;
};

// The expected combine of source token t on `source`: hidden bf16 values, then num_topk weights.
// value(rank, row, j) and weight(rank, row, k) read the combine's inputs on the receiving ranks.
template <class Value, class Weight>
void expected_combine(ReceivedRows const& received, int num_nvl_ranks, bool bf16_node_partials, int source, int t,
                      int hidden, int num_topk, Value value, Weight weight, uint16_t* out_x, float* out_weights) {
  ReceivedRows::Row const* const first = received.begin(source, t);
  ReceivedRows::Row const* const last = received.end(source, t);
  auto sum = [&](auto element, bool round_partials) {
    float acc = 0.0f;
    for (ReceivedRows::Row const* node_first = first; node_first != last;) {
      int const node = node_first->rank / num_nvl_ranks;
      float partial = 0.0f;
      ReceivedRows::Row const* row = node_first;
      for (; row != last && row->rank / num_nvl_ranks == node; ++row) partial = partial + element(*row);
      if (round_partials) partial = test::ref_bf16_to_float(test::ref_float_to_bf16(partial));
      acc = acc + partial;
      node_first = row;
    }
    return acc;
  };
  for (int j = 0; j < hidden; ++j)
    out_x[j] = test::ref_float_to_bf16(
        sum([&](ReceivedRows::Row const& row) { return test::ref_bf16_to_float(value(row.rank, row.row, j)); },
            bf16_node_partials));
  for (int k = 0; k < num_topk; ++k)
    out_weights[k] = sum([&](ReceivedRows::Row const& row) { return weight(row.rank, row.row, k); }, false);
}

// Runs body(rank) for every rank on its own thread (the host references of 8 ranks x 4096 tokens x hidden
// 7168 take about a minute on one core; a GPU machine has cores to spare). Rethrows the first failure.
template <class Body>
void for_each_rank_in_parallel(int num_ranks, Body body) {
  std::vector<std::exception_ptr> failures(static_cast<size_t>(num_ranks));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < num_ranks; ++rank)
    threads.emplace_back([&, rank] {
      try {
        body(rank);
      } catch (...) {
        failures[size_t(rank)] = std::current_exception();
      }
    });
  for (std::thread& thread : threads) thread.join();
  for (std::exception_ptr const& failure : failures)
    if (failure) std::rethrow_exception(failure);
}

// What every rank receives (dispatch_reference.hpp), ranks in parallel.
inline std::vector<test::ExpectedReceive> expected_receives(Problem const& problem,
                                                             std::vector<test::RankTokens> const& tokens,
                                                             int expert_alignment) {
  std::vector<test::ExpectedReceive> expected(static_cast<size_t>(problem.num_ranks));
  for_each_rank_in_parallel(problem.num_ranks, [&](int rank) {
    expected[size_t(rank)] = test::expected_receive(problem.dispatch_shape(), tokens, rank, expert_alignment);
  });
  return expected;
}

// The experts' outputs: one random bf16 row per received row (test_common.hpp), ranks in parallel.
inline std::vector<std::vector<uint16_t>> make_expert_outputs(Problem const& problem,
                                                               std::vector<test::ExpectedReceive> const& expected) {
  std::vector<std::vector<uint16_t>> rows(static_cast<size_t>(problem.num_ranks));
  size_t const H = size_t(problem.hidden);
  for_each_rank_in_parallel(problem.num_ranks, [&](int rank) {
    std::mt19937_64 rng(problem.seed * 7919 + uint64_t(rank));
    size_t const M = expected[size_t(rank)].recv_src_idx.size();
    rows[size_t(rank)].resize(M * H);
    for (size_t m = 0; m < M; ++m) test::fill_random_expert_row(rng, &rows[size_t(rank)][m * H], problem.hidden);
  });
  return rows;
}

// One rank's expected combine outputs.
struct ExpectedCombine {
  std::vector<uint16_t> combined_x;       // [N, hidden] bf16
  std::vector<float> combined_weights;    // [N, K]
};

// Every rank's expected combine of `expert_out` (the rows each rank received, in its receive order) and of
// the received weights, ranks in parallel; node partials rounded to bf16 when `bf16_node_partials`.
inline std::vector<ExpectedCombine> expected_combines(Problem const& problem,
                                                      std::vector<test::ExpectedReceive> const& expected,
                                                      std::vector<std::vector<uint16_t>> const& expert_out,
                                                      bool bf16_node_partials) {
  int const R = problem.num_ranks, N = problem.num_tokens, K = problem.num_topk;
  size_t const H = size_t(problem.hidden);
  ReceivedRows const received(R, N, expected);
  std::vector<ExpectedCombine> combines(static_cast<size_t>(R));
  for_each_rank_in_parallel(R, [&](int s) {
    ExpectedCombine& want = combines[size_t(s)];
    want.combined_x.resize(size_t(N) * H);
    want.combined_weights.resize(size_t(N) * size_t(K));
    for (int t = 0; t < N; ++t)
      expected_combine(
          received, problem.num_nvl_ranks, bf16_node_partials, s, t, problem.hidden, K,
          [&](int d, int m, int j) { return expert_out[size_t(d)][size_t(m) * H + size_t(j)]; },
          [&](int d, int m, int k) { return expected[size_t(d)].recv_topk_weights[size_t(m) * size_t(K) + size_t(k)]; },
          &want.combined_x[size_t(t) * H], &want.combined_weights[size_t(t) * size_t(K)]);
  });
  return combines;
}

}  // namespace epcomm::gpu_check
