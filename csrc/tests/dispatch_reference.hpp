#pragma once
// Host reference of normal-mode dispatch (intranode and internode alike), written from the contract
// (reference.py), never from the kernels: which rows each rank receives and in what order (source
// ranks ascending, each source's tokens ascending), the top-k entries as the receiver sees them, the
// per-expert receive counts, and which received rows a combine sums back into a token. Also the
// inputs it reads (RankTokens) and their random parts that do not depend on the routing.

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace epcomm::test {

// The tokens one rank dispatches.
struct RankTokens {
  int num_tokens = 0;
  std::vector<uint8_t> x, x_scales;  // [N, hidden_bytes], [N, scale_bytes]
  std::vector<int64_t> topk_idx;     // [N, K]; -1 = no expert
  std::vector<float> topk_weights;   // [N, K]
};

// What the reference needs of a test's shape. Expert e lives on rank e / num_local_experts.
struct DispatchShape {
  int num_local_experts, num_topk;
  int hidden_bytes, scale_bytes;  // of one row: its data, and its FP8 scales (0 for bf16)
};

// One row of `hidden` elements: FP8 is a byte an element plus an fp32 scale per 128 elements, bf16 two bytes.
inline int row_hidden_bytes(int hidden, bool fp8) { return fp8 ? hidden : 2 * hidden; }
inline int row_scale_bytes(int hidden, bool fp8) { return fp8 ? 4 * (hidden / 128) : 0; }

// `num_tokens` tokens of random row bytes (data, then scales, both from `rng`); the routing is the caller's.
inline void fill_random_rows(RankTokens& tokens, int num_tokens, DispatchShape const& shape, std::mt19937_64& rng) {
  tokens.num_tokens = num_tokens;
  tokens.x.resize(size_t(num_tokens) * shape.hidden_bytes);
  tokens.x_scales.resize(size_t(num_tokens) * shape.scale_bytes);
  for (auto& b : tokens.x) b = uint8_t(rng());
  for (auto& b : tokens.x_scales) b = uint8_t(rng());
}

// Tokens per rank, drawn from [base / 2, base / 2 + base]; the middle rank has none.
inline std::vector<int> token_counts(int num_ranks, int base, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> counts(num_ranks);
  for (int r = 0; r < num_ranks; ++r) counts[r] = base / 2 + int(rng() % uint64_t(base + 1));
  counts[num_ranks / 2] = 0;  // a rank with no tokens
  return counts;
}

// Whether token t has an expert on `rank` (such a token goes there once, whatever its number of experts there).
inline bool token_goes_to(DispatchShape const& shape, RankTokens const& tokens, int t, int rank) {
  for (int k = 0; k < shape.num_topk; ++k) {
    int64_t const e = tokens.topk_idx[size_t(t) * shape.num_topk + k];
    if (e >= 0 && e / shape.num_local_experts == rank) return true;
  }
  return false;
}

// What one rank receives, row by row.
struct ExpectedReceive {
  std::vector<uint8_t> recv_x, recv_x_scales;
  std::vector<int64_t> recv_topk_idx;      // local expert ids; -1 for experts on other ranks
  std::vector<float> recv_topk_weights;    // 0 for experts on other ranks
  std::vector<int32_t> recv_src_idx, recv_src_rank;
  std::vector<int32_t> num_recv_tokens_per_expert;  // rounded up to the expert alignment
};

inline ExpectedReceive expected_receive(DispatchShape const& shape, std::vector<RankTokens> const& sources, int rank,
                                        int expert_alignment) {
  ExpectedReceive out;
  int const hb = shape.hidden_bytes, sb = shape.scale_bytes, K = shape.num_topk;
  out.num_recv_tokens_per_expert.assign(shape.num_local_experts, 0);
  for (int s = 0; s < int(sources.size()); ++s) {
    RankTokens const& d = sources[s];
    for (int t = 0; t < d.num_tokens; ++t) {
      if (!token_goes_to(shape, d, t, rank)) continue;
      out.recv_x.insert(out.recv_x.end(), d.x.begin() + size_t(t) * hb, d.x.begin() + size_t(t + 1) * hb);
      out.recv_x_scales.insert(out.recv_x_scales.end(), d.x_scales.begin() + size_t(t) * sb,
                               d.x_scales.begin() + size_t(t + 1) * sb);
      out.recv_src_idx.push_back(t);
      out.recv_src_rank.push_back(s);
      for (int k = 0; k < K; ++k) {
        int64_t const e = d.topk_idx[size_t(t) * K + k];
        bool const local = e >= 0 && e / shape.num_local_experts == rank;
        out.recv_topk_idx.push_back(local ? e - int64_t(rank) * shape.num_local_experts : -1);
        out.recv_topk_weights.push_back(local ? d.topk_weights[size_t(t) * K + k] : 0.0f);
        if (local) ++out.num_recv_tokens_per_expert[e - int64_t(rank) * shape.num_local_experts];
      }
    }
  }
  for (int32_t& count : out.num_recv_tokens_per_expert)
    count = (count + expert_alignment - 1) / expert_alignment * expert_alignment;
  return out;
}

// Where token t of rank `source` was received: (receiving rank, row on it), receiving ranks ascending.
inline std::vector<std::pair<int, int>> received_rows_of(std::vector<ExpectedReceive> const& expected, int source,
                                                         int t) {
  std::vector<std::pair<int, int>> rows;
  for (int d = 0; d < int(expected.size()); ++d)
    for (size_t m = 0; m < expected[d].recv_src_idx.size(); ++m)
      if (expected[d].recv_src_rank[m] == source && expected[d].recv_src_idx[m] == t) rows.push_back({d, int(m)});
  return rows;
}

}  // namespace epcomm::test
