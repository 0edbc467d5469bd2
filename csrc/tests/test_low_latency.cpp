// The low-latency kernels (dispatch send/recv, combine send/recv) with all ranks in one process: each
// rank's RDMA buffer is a plain allocation holding the LL region at a nonzero offset, the transport is
// ShmTransport over them, and a send kernel and its receive kernel run in ONE concurrent launch, so the
// receivers really wait on the senders' signals (what ThreadSanitizer checks). Every output is compared
// bit for bit with a host reference written here from the contract (low_latency.hpp): per-expert
// slices in source-rank order, FP8 data and scales from a table-based e4m3 quantizer, UE8M0 packing,
// combine sums in the contract's order. Also built with EPCOMM_PLANT_LL_COUNT_CLAIMS_UNIT, where
// TSAN must report the receiver reading rows that have not landed.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/low_latency.hpp"
#include "../kernels/low_latency_common.cuh"
#include "../kernels/low_latency_validate.hpp"
#include "cluster_common.hpp"
#include "harness.hpp"
#include "test_common.hpp"

using namespace epcomm;
using kernels::LowLatencyLayout;
using test::error_text;
using test::ref_bf16_to_float;
using test::ref_float_to_bf16;
using transport::ShmTransport;

namespace {

// ---- reference FP8 (independent of the kernels' bit tricks) -----------------------------------------

// Value of an e4m3fn code 0..0x7e (non-negative).
double e4m3_value(int code) {
  int const exponent = code >> 3, mantissa = code & 7;
  return exponent == 0 ? std::ldexp(double(mantissa), -9) : std::ldexp(1.0 + mantissa / 8.0, exponent - 7);
}

// Nearest code by search over the table, ties to the even code; saturates (nothing is above 448).
uint8_t ref_e4m3(float value) {
  double const magnitude = std::fabs(double(value));
  int best = 0;
  for (int code = 1; code <= 0x7e; ++code) {
    double const d = std::fabs(e4m3_value(code) - magnitude), b = std::fabs(e4m3_value(best) - magnitude);
    if (d < b || (d == b && code % 2 == 0)) best = code;
  }
  return uint8_t(best | (std::signbit(value) ? 0x80 : 0));
}

// max(amax, 1e-4) / 448 (epcomm/fp8.py's rule); with round_scale the smallest power of two >= it.
float ref_scale(float amax, bool round_scale) {
  float const scale = std::max(amax, 1e-4f) / 448.0f;
  if (!round_scale) return scale;
  int exponent = 0;
  float const mantissa = std::frexp(scale, &exponent);  // scale = mantissa * 2^exponent, mantissa in [0.5, 1)
  return std::ldexp(1.0f, mantissa == 0.5f ? exponent - 1 : exponent);
}

// ---- shapes, inputs, reference --------------------------------------------------------------------

struct Mode {
  bool fp8 = false, round_scale = false, ue8m0 = false;
};

struct Shape {
  int num_ranks, num_local_experts, num_max_tokens, hidden, num_topk;
  int num_experts() const { return num_ranks * num_local_experts; }
  int64_t rows_per_expert() const { return int64_t(num_ranks) * num_max_tokens; }
};

struct RankInput {
  int num_tokens = 0;
  std::vector<uint16_t> x;      // [N, H] bf16
  std::vector<int64_t> topk;    // [N, K]
  std::vector<float> weights;   // [N, K]
};

std::vector<int> token_counts(Shape const& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> counts(shape.num_ranks);
  for (int& c : counts) c = int(rng() % uint64_t(shape.num_max_tokens + 1));
  counts[0] = shape.num_max_tokens;                      // a full rank
  if (shape.num_ranks > 1) counts[shape.num_ranks / 2 + (shape.num_ranks > 2)] = 0;  // an empty rank
  return counts;
}

// Rows with exponents far apart, some 128-blocks all zero, some tiny (amax < 1e-4), some with a lone large
// value; distinct experts per token, about one entry in five -1.
std::vector<RankInput> make_inputs(Shape const& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> const counts = token_counts(shape, seed + 1);
  std::vector<RankInput> inputs(shape.num_ranks);
  int const K = shape.num_topk, H = shape.hidden, E = shape.num_experts();
  for (int r = 0; r < shape.num_ranks; ++r) {
    RankInput& in = inputs[r];
    in.num_tokens = counts[r];
    in.x.resize(size_t(in.num_tokens) * H);
    for (int t = 0; t < in.num_tokens; ++t) {
      for (int b = 0; b < H; b += 128) {
        int const kind = int(rng() % 8), span = std::min(128, H - b);
        for (int i = 0; i < span; ++i) {
          float value = 0.0f;
          if (kind != 0) {
            float const magnitude = std::ldexp(1.0f + float(rng() % 128) / 128.0f, int(rng() % 40) - 20);
            value = rng() % 2 ? magnitude : -magnitude;
            if (kind == 1 && i == 7) value = 3.0e4f;    // one large value
            if (kind == 2) value = std::ldexp(value, -40);  // amax below the 1e-4 clamp
          }
          in.x[size_t(t) * H + b + i] = ref_float_to_bf16(value);
        }
      }
    }
    in.topk.assign(size_t(in.num_tokens) * K, -1);
    in.weights.resize(in.topk.size());
    for (int t = 0; t < in.num_tokens; ++t) {
      std::vector<int64_t> experts(E);
      for (int e = 0; e < E; ++e) experts[e] = e;
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < K; ++k) {
        if (k < E && rng() % 5 != 0) in.topk[size_t(t) * K + k] = experts[k];
        in.weights[size_t(t) * K + k] = float(int(rng() % 2001) - 1000) / 997.0f;
      }
    }
  }
  return inputs;
}

bool routes_to(Shape const& shape, RankInput const& in, int token, int64_t expert) {
  for (int k = 0; k < shape.num_topk; ++k)
    if (in.topk[size_t(token) * shape.num_topk + k] == expert) return true;
  return false;
}

struct Reference {
  std::vector<std::vector<int32_t>> slot_of;           // [rank][N * K]
  std::vector<std::vector<int32_t>> recv_count;        // [rank][L]
  std::vector<std::vector<int64_t>> layout_range;      // [rank][L * R]
  std::vector<std::vector<std::pair<int, int>>> rows;  // [rank * L + j]: (source, token) per row
};

Reference reference_dispatch(Shape const& shape, std::vector<RankInput> const& inputs) {
  int const R = shape.num_ranks, L = shape.num_local_experts, K = shape.num_topk;
  Reference ref;
  ref.slot_of.resize(R);
  for (int s = 0; s < R; ++s) {
    RankInput const& in = inputs[s];
    ref.slot_of[s].assign(size_t(in.num_tokens) * K, -1);
    for (int t = 0; t < in.num_tokens; ++t)
      for (int k = 0; k < K; ++k) {
        int64_t const e = in.topk[size_t(t) * K + k];
        if (e < 0) continue;
        int before = 0;
        for (int u = 0; u < t; ++u) before += routes_to(shape, in, u, e);
        ref.slot_of[s][size_t(t) * K + k] = before;
      }
  }
  ref.recv_count.assign(R, std::vector<int32_t>(L, 0));
  ref.layout_range.assign(R, std::vector<int64_t>(size_t(L) * R, 0));
  ref.rows.assign(size_t(R) * L, {});
  for (int d = 0; d < R; ++d)
    for (int j = 0; j < L; ++j) {
      auto& rows = ref.rows[size_t(d) * L + j];
      for (int s = 0; s < R; ++s) {
        int64_t const begin = int64_t(rows.size());
        for (int t = 0; t < inputs[s].num_tokens; ++t)
          if (routes_to(shape, inputs[s], t, int64_t(d) * L + j)) rows.push_back({s, t});
        ref.layout_range[d][size_t(j) * R + s] = begin << 32 | (int64_t(rows.size()) - begin);
      }
      ref.recv_count[d][j] = int32_t(rows.size());
    }
  return ref;
}

// One token's message as the contract defines it: data bytes and per-block scale words.
void reference_row(Shape const& shape, Mode mode, uint16_t const* x, std::vector<uint8_t>& data,
                   std::vector<uint32_t>& scale_words) {
  int const H = shape.hidden;
  data.clear();
  scale_words.clear();
  if (!mode.fp8) {
    data.resize(size_t(H) * 2);
    std::memcpy(data.data(), x, data.size());
    return;
  }
  std::vector<float> scales;
  for (int b = 0; b < H; b += 128) {
    float amax = 0.0f;
    for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(ref_bf16_to_float(x[b + i])));
    float const scale = ref_scale(amax, mode.round_scale);
    scales.push_back(scale);
    for (int i = 0; i < 128; ++i) data.push_back(ref_e4m3(ref_bf16_to_float(x[b + i]) / scale));
  }
  if (!mode.ue8m0) {
    for (float s : scales) scale_words.push_back(std::bit_cast<uint32_t>(s));
    return;
  }
  for (size_t i = 0; i < scales.size(); i += 4) {
    uint32_t word = 0;
    for (size_t q = 0; q < 4; ++q) {
      int exponent = 0;
      float const mantissa = std::frexp(scales[i + q], &exponent);  // 2^(exponent - 1)
      CHECK(mantissa == 0.5f);
      word |= uint32_t(exponent - 1 + 127) << (8 * q);
    }
    scale_words.push_back(word);
  }
}

// ---- all ranks' buffers ---------------------------------------------------------------------------

constexpr size_t kRegionOffset = 4096;  // the LL region does not start at the buffer's base

struct Cluster : test::InProcessRanks {
  Shape shape;
  LowLatencyLayout layout;
  std::vector<char*> rdma_buffers;
  test::LinkByteCounters link_bytes;
  std::vector<std::vector<int32_t>> cumulative_stats;  // [rank][L]
  std::vector<std::vector<int64_t>> wait_stats;        // [rank][R]

  explicit Cluster(Shape const& s, std::optional<uint64_t> seed = std::nullopt)
      : InProcessRanks("low-latency", s.num_ranks, seed),
        shape(s),
        layout(s.num_max_tokens, s.hidden, s.num_ranks, s.num_local_experts, kRegionOffset),
        link_bytes(s.num_ranks) {
    if (char const* problem =
            kernels::validate_low_latency_shape(s.num_max_tokens, s.hidden, s.num_ranks, s.num_local_experts))
      throw test::CheckFailure(problem);
    for (int r = 0; r < s.num_ranks; ++r) rdma_buffers.push_back(allocate(kRegionOffset + layout.required_bytes()));
    cumulative_stats.assign(s.num_ranks, std::vector<int32_t>(s.num_local_experts, 0));
    wait_stats.assign(s.num_ranks, std::vector<int64_t>(s.num_ranks, 0));
  }

  kernels::ShmLowLatencyComm comm(int rank) {
    kernels::ShmLowLatencyComm c = comm_for<kernels::ShmLowLatencyComm>(rank);
    c.layout = layout;
    // one rank per node: every put to a peer counts as network traffic
    c.transport = ShmTransport{rank, shape.num_ranks, 1, rdma_buffers.data(), layout.signals_buffer_offset(),
                               link_bytes.of_rank(rank)};
    return c;
  }

  // `clean`: zero every rank's signals (the kernels are not running).
  void clean() {
    for (char* buffer : rdma_buffers) std::memset(buffer + kRegionOffset, 0, layout.counters_end());
  }

  uint16_t* zero_copy_buffer(int rank, int slot) {
    return reinterpret_cast<uint16_t*>(rdma_buffers[rank] + layout.combine_send_buffer(slot));
  }
};

struct RankOutput {
  std::vector<int32_t> slot_of, recv_count, src_info;
  std::vector<int64_t> layout_range;
  std::vector<uint8_t> recv_x;
  std::vector<uint32_t> recv_scales;
  std::vector<uint16_t> combined;
  bool operator==(RankOutput const&) const = default;
};

struct Call {
  int slot;
  Mode mode;
  bool zero_copy = false;
};

// One call (dispatch + combine) in pieces, so that tests can launch its kernels in any grouping.
struct CallState {
  Call call;
  std::vector<RankInput> const* inputs;
  uint64_t seed;
  Reference ref;
  kernels::LowLatencyMessage format;
  std::vector<RankOutput> out;
  std::vector<std::vector<uint16_t>> expert_out;  // [rank][L * R * M * H] bf16

  CallState(Cluster& cluster, Call const& call_, std::vector<RankInput> const& inputs_, uint64_t seed_)
      : call(call_), inputs(&inputs_), seed(seed_), ref(reference_dispatch(cluster.shape, inputs_)),
        format(kernels::low_latency_message(cluster.shape.hidden, call_.mode.fp8, call_.mode.ue8m0)),
        out(cluster.shape.num_ranks), expert_out(cluster.shape.num_ranks) {
    Shape const& shape = cluster.shape;
    int const L = shape.num_local_experts, R = shape.num_ranks;
    int64_t const rows = shape.rows_per_expert();
    for (int r = 0; r < R; ++r) {
      RankOutput& o = out[r];
      o.slot_of.assign(size_t(inputs_[r].num_tokens) * shape.num_topk, -7);
      o.recv_x.assign(size_t(L) * rows * format.data_bytes, 0xee);
      o.recv_scales.assign(std::max<size_t>(1, size_t(L) * format.scale_words * rows), 0xeeeeeeeeu);
      o.recv_count.assign(L, -7);
      o.src_info.assign(size_t(L) * rows, -7);
      o.layout_range.assign(size_t(L) * R, -7);
      o.combined.assign(size_t(inputs_[r].num_tokens) * shape.hidden, 0xeeee);
    }
  }

  void add_dispatch_send(simt::ConcurrentLaunch& launch, Cluster& cluster, int r) {
    RankInput const& in = (*inputs)[r];
    kernels::LowLatencyDispatchSendArgs<ShmTransport> send;
    send.comm = cluster.comm(r);
    send.slot = call.slot;
    send.x = in.x.data();
    send.num_tokens = in.num_tokens;
    send.topk_idx = in.topk.data();
    send.num_topk = cluster.shape.num_topk;
    send.use_fp8 = call.mode.fp8;
    send.round_scale = call.mode.round_scale;
    send.use_ue8m0 = call.mode.ue8m0;
    send.slot_of = out[r].slot_of.data();
    kernels::add_low_latency_dispatch_send(launch, send);
  }

  void add_dispatch_recv(simt::ConcurrentLaunch& launch, Cluster& cluster, int r) {
    RankOutput& o = out[r];
    kernels::LowLatencyDispatchRecvArgs<ShmTransport> recv;
    recv.comm = cluster.comm(r);
    recv.slot = call.slot;
    recv.use_fp8 = call.mode.fp8;
    recv.use_ue8m0 = call.mode.ue8m0;
    recv.recv_x = o.recv_x.data();
    recv.recv_x_scales = call.mode.fp8 ? o.recv_scales.data() : nullptr;
    recv.recv_count = o.recv_count.data();
    recv.src_info = o.src_info.data();
    recv.layout_range = o.layout_range.data();
    recv.cumulative_local_expert_recv_stats = cluster.cumulative_stats[r].data();
    recv.dispatch_wait_recv_cost_stats = cluster.wait_stats[r].data();
    kernels::add_low_latency_dispatch_recv(launch, recv);
  }

  void check_dispatch(Cluster& cluster) {
    Shape const& shape = cluster.shape;
    int const L = shape.num_local_experts, H = shape.hidden;
    int64_t const rows_per_expert = shape.rows_per_expert();
    std::vector<uint8_t> data;
    std::vector<uint32_t> words;
    for (int d = 0; d < shape.num_ranks; ++d) {
      RankOutput const& o = out[d];
      CHECK(o.slot_of == ref.slot_of[d]);
      CHECK(o.recv_count == ref.recv_count[d]);
      CHECK(o.layout_range == ref.layout_range[d]);
      for (int j = 0; j < L; ++j) {
        auto const& rows = ref.rows[size_t(d) * L + j];
        for (size_t row = 0; row < rows.size(); ++row) {
          auto const [source, token] = rows[row];
          int64_t const out_row = int64_t(j) * rows_per_expert + int64_t(row);
          CHECK_EQ(o.src_info[out_row], token);
          reference_row(shape, call.mode, (*inputs)[source].x.data() + size_t(token) * H, data, words);
          CHECK(std::memcmp(o.recv_x.data() + out_row * format.data_bytes, data.data(), data.size()) == 0);
          CHECK_EQ(int(words.size()), format.scale_words);
          for (int w = 0; w < format.scale_words; ++w)
            CHECK_EQ(o.recv_scales[(size_t(j) * format.scale_words + w) * rows_per_expert + row], words[w]);
        }
      }
    }
  }

  // Expert outputs: random bf16 rows (some all -0.0), NaN past recv_count (never read); with zero_copy
  // written straight into each rank's zero-copy buffer of the slot.
  void make_expert_outputs(Cluster& cluster) {
    Shape const& shape = cluster.shape;
    int const L = shape.num_local_experts, H = shape.hidden;
    int64_t const rows_per_expert = shape.rows_per_expert();
    std::mt19937_64 rng(seed * 7919 + 3);
    for (int d = 0; d < shape.num_ranks; ++d) {
      expert_out[d].assign(size_t(L) * rows_per_expert * H, 0x7fc0);
      for (int j = 0; j < L; ++j)
        for (int row = 0; row < ref.recv_count[d][j]; ++row)
          test::fill_random_expert_row(rng, &expert_out[d][(size_t(j) * rows_per_expert + row) * H], H);
      if (call.zero_copy)
        std::memcpy(cluster.zero_copy_buffer(d, call.slot), expert_out[d].data(), expert_out[d].size() * 2);
    }
  }

  void add_combine_send(simt::ConcurrentLaunch& launch, Cluster& cluster, int r) {
    kernels::LowLatencyCombineSendArgs<ShmTransport> send;
    send.comm = cluster.comm(r);
    send.slot = call.slot;
    send.x = call.zero_copy ? static_cast<void const*>(cluster.zero_copy_buffer(r, call.slot)) : expert_out[r].data();
    send.layout_range = out[r].layout_range.data();
    kernels::add_low_latency_combine_send(launch, send);
  }

  void add_combine_recv(simt::ConcurrentLaunch& launch, Cluster& cluster, int r) {
    RankInput const& in = (*inputs)[r];
    kernels::LowLatencyCombineRecvArgs<ShmTransport> recv;
    recv.comm = cluster.comm(r);
    recv.slot = call.slot;
    recv.num_tokens = in.num_tokens;
    recv.topk_idx = in.topk.data();
    recv.topk_weights = in.weights.data();
    recv.num_topk = cluster.shape.num_topk;
    recv.slot_of = out[r].slot_of.data();
    recv.out = out[r].combined.data();
    kernels::add_low_latency_combine_recv(launch, recv);
  }

  // out[n] = bf16(0 + w_0 * row_0 + w_1 * row_1 + ...), k ascending, fp32, one rounding
  void check_combine(Cluster& cluster) {
    Shape const& shape = cluster.shape;
    int const R = shape.num_ranks, L = shape.num_local_experts, K = shape.num_topk, H = shape.hidden;
    int64_t const rows_per_expert = shape.rows_per_expert();
    for (int s = 0; s < R; ++s) {
      RankInput const& in = (*inputs)[s];
      for (int t = 0; t < in.num_tokens; ++t)
        for (int h = 0; h < H; ++h) {
          float acc = 0.0f;
          for (int k = 0; k < K; ++k) {
            int64_t const e = in.topk[size_t(t) * K + k];
            if (e < 0) continue;
            int const d = int(e / L), j = int(e % L);
            int64_t const begin = ref.layout_range[d][size_t(j) * R + s] >> 32;
            int64_t const row = begin + ref.slot_of[s][size_t(t) * K + k];
            float const product = in.weights[size_t(t) * K + k] *
                                  ref_bf16_to_float(expert_out[d][(size_t(j) * rows_per_expert + row) * H + h]);
            acc = acc + product;
          }
          test::check_combined_element(out[s].combined[size_t(t) * H + h], ref_float_to_bf16(acc), s, t, h);
        }
    }
  }
};

// Each op of a call in three launches: the first half of the ranks send; their receivers then run next to
// the other half's senders (they wait on kernels running at the same time); then the other half receives.
// A rank's receive kernel always follows its own send kernel, as in its stream on a GPU (it reads the
// generation its send kernel counted).
template <class AddSend, class AddRecv>
void run_op(Cluster& cluster, std::string const& name, AddSend&& add_send, AddRecv&& add_recv) {
  int const R = cluster.shape.num_ranks, half = (R + 1) / 2;
  std::string const names[3] = {name + "_first_senders", name + "_first_receivers_other_senders",
                                name + "_other_receivers"};  // alive while the launches run
  simt::ConcurrentLaunch first(cluster.options(names[0].c_str()));
  simt::ConcurrentLaunch middle(cluster.options(names[1].c_str()));
  simt::ConcurrentLaunch last(cluster.options(names[2].c_str()));
  for (int r = 0; r < R; ++r) {
    add_send(r < half ? first : middle, r);
    add_recv(r < half ? middle : last, r);
  }
  cluster.run(first);
  cluster.run(middle);
  if (half < R) cluster.run(last);
}

// One dispatch + combine on every rank (run_op), checked against the reference and the transport's byte counts.
std::vector<RankOutput> run_call(Cluster& cluster, Call const& call, std::vector<RankInput> const& inputs,
                                 uint64_t seed) {
  Shape const& shape = cluster.shape;
  int const R = shape.num_ranks, L = shape.num_local_experts;
  CallState state(cluster, call, inputs, seed);
  cluster.link_bytes.take_total();
  {
    std::vector<std::vector<int64_t>> const wait_before = cluster.wait_stats;
    run_op(
        cluster, "low_latency_dispatch",
        [&](simt::ConcurrentLaunch& launch, int r) { state.add_dispatch_send(launch, cluster, r); },
        [&](simt::ConcurrentLaunch& launch, int r) { state.add_dispatch_recv(launch, cluster, r); });
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < R; ++s) CHECK(cluster.wait_stats[r][s] >= wait_before[r][s]);
  }
  // Traffic: every (token, expert) message once, plus one int32 count per (expert, source)
  {
    uint64_t expected = 0;
    for (int s = 0; s < R; ++s) {
      for (int64_t e : inputs[s].topk) expected += e >= 0 ? uint64_t(state.format.used_bytes()) : 0;
      expected += uint64_t(shape.num_experts()) * 4;
    }
    CHECK_EQ(cluster.link_bytes.take_total(), expected);
  }
  state.check_dispatch(cluster);
  state.make_expert_outputs(cluster);
  run_op(
      cluster, "low_latency_combine",
      [&](simt::ConcurrentLaunch& launch, int r) { state.add_combine_send(launch, cluster, r); },
      [&](simt::ConcurrentLaunch& launch, int r) { state.add_combine_recv(launch, cluster, r); });
  {
    uint64_t rows = 0;
    for (int d = 0; d < R; ++d)
      for (int j = 0; j < L; ++j) rows += uint64_t(state.ref.recv_count[d][j]);
    CHECK_EQ(cluster.link_bytes.take_total(), rows * uint64_t(shape.hidden) * 2);
  }
  state.check_combine(cluster);
  return state.out;
}

// A sequence of calls on both slots without clean in between: bf16, FP8 (zero-copy combine), FP8 + UE8M0
// (generation 2 of slot 0), the last repeated on slot 1 (generation 2) with identical outputs; then clean and
// a first generation again (zero-copy).
void run_sequence(Shape const& shape, uint64_t seed, std::optional<uint64_t> fuzz_seed = std::nullopt) {
  Cluster cluster(shape, fuzz_seed);
  int const R = shape.num_ranks, L = shape.num_local_experts;
  std::vector<std::vector<int32_t>> expected_stats(R, std::vector<int32_t>(L, 0));
  auto const account = [&](std::vector<RankInput> const& inputs) {
    Reference const ref = reference_dispatch(shape, inputs);
    for (int d = 0; d < R; ++d)
      for (int j = 0; j < L; ++j) expected_stats[d][j] += ref.recv_count[d][j];
  };
  bool const ue8m0_fits = shape.hidden % 512 == 0, fp8_fits = shape.hidden % 128 == 0;
  Mode const bf16{}, fp8{true, false, false}, ue8m0{true, true, ue8m0_fits};

  std::vector<RankInput> a = make_inputs(shape, seed), b = make_inputs(shape, seed + 1), c = make_inputs(shape, seed + 2);
  run_call(cluster, {0, bf16, false}, a, seed);
  account(a);
  run_call(cluster, {1, fp8_fits ? fp8 : bf16, true}, b, seed + 1);
  account(b);
  std::vector<RankOutput> const first = run_call(cluster, {0, fp8_fits ? ue8m0 : bf16, false}, c, seed + 2);
  account(c);
  std::vector<RankOutput> const second = run_call(cluster, {1, fp8_fits ? ue8m0 : bf16, false}, c, seed + 2);
  account(c);
  for (int r = 0; r < R; ++r) CHECK(first[r] == second[r]);  // repeats are bitwise identical
  CHECK(cluster.cumulative_stats == expected_stats);
  // clean restarts the generations
  cluster.clean();
  run_call(cluster, {0, bf16, true}, a, seed + 3);
}

int const kMaxTokens = test::kSanitized ? 6 : 16;

// Shape: ranks, local experts, num_max_tokens, hidden, top-k.
EPCOMM_TEST(low_latency_2x2) { run_sequence({2, 2, kMaxTokens, 512, 3}, 101); }

EPCOMM_TEST(low_latency_4x2) { run_sequence({4, 2, kMaxTokens, 512, 4}, 201); }

EPCOMM_TEST(low_latency_8x1) { run_sequence({8, 1, kMaxTokens, test::kSanitized ? 128 : 512, 8}, 301); }

EPCOMM_TEST(low_latency_4x3) { run_sequence({4, 3, kMaxTokens, 128, 9}, 401); }

// hidden not a multiple of 128: bf16 only; one rank; top-16 over 16 experts
EPCOMM_TEST(low_latency_bf16_odd_hidden_and_top16) {
  run_sequence({2, 3, kMaxTokens, 136, 5}, 501);
  run_sequence({1, 16, kMaxTokens, 64, 16}, 502);
}

EPCOMM_TEST(low_latency_fuzzed_schedules) {
  for (uint64_t seed = 1; seed <= (test::kSanitized ? 2u : 6u); ++seed)
    run_sequence({seed % 2 ? 2 : 3, 2, 4, 128, 3}, 600 + seed, seed);
}

// Two calls in flight on the two slots, their kernels overlapping in the same launches (each rank's receive
// after its send, as in its stream):
//   [send A] [recv A + send B] [recv B + combine-send A] [combine-recv A + combine-send B] [combine-recv B]
EPCOMM_TEST(low_latency_overlapping_slots) {
  Shape const shape{4, 2, kMaxTokens, 256, 4};
  Cluster cluster(shape);
  std::vector<RankInput> const a = make_inputs(shape, 801), b = make_inputs(shape, 802);
  CallState first(cluster, {0, {true, true, false}, false}, a, 801);
  CallState second(cluster, {1, {}, true}, b, 802);
  cluster.run_on_every_rank("send_a", [&](simt::ConcurrentLaunch& l, int r) {
    first.add_dispatch_send(l, cluster, r);
  });
  cluster.run_on_every_rank("recv_a_send_b", [&](simt::ConcurrentLaunch& l, int r) {
    first.add_dispatch_recv(l, cluster, r);
    second.add_dispatch_send(l, cluster, r);
  });
  first.check_dispatch(cluster);
  first.make_expert_outputs(cluster);
  cluster.run_on_every_rank("recv_b_combine_send_a", [&](simt::ConcurrentLaunch& l, int r) {
    second.add_dispatch_recv(l, cluster, r);
    first.add_combine_send(l, cluster, r);
  });
  second.check_dispatch(cluster);
  second.make_expert_outputs(cluster);
  cluster.run_on_every_rank("combine_recv_a_combine_send_b", [&](simt::ConcurrentLaunch& l, int r) {
    first.add_combine_recv(l, cluster, r);
    second.add_combine_send(l, cluster, r);
  });
  first.check_combine(cluster);
  cluster.run_on_every_rank("combine_recv_b", [&](simt::ConcurrentLaunch& l, int r) {
    second.add_combine_recv(l, cluster, r);
  });
  second.check_combine(cluster);
}

// A rank that never runs its send kernel: the others' receivers time out naming it.
EPCOMM_TEST(low_latency_timeout_names_the_missing_peer) {
  Shape const shape{3, 1, 4, 128, 2};
  Cluster cluster(shape);
  std::vector<RankInput> inputs = make_inputs(shape, 700);
  std::vector<std::vector<int32_t>> slot_of(3), recv_count(3, std::vector<int32_t>(1)), src_info(3, std::vector<int32_t>(12));
  std::vector<std::vector<int64_t>> layout_range(3, std::vector<int64_t>(3));
  std::vector<std::vector<uint16_t>> recv_x(3, std::vector<uint16_t>(12 * 128));
  // The others' send kernels first (all their rows land), then every receive kernel
  simt::ConcurrentLaunch senders(cluster.options("low_latency_missing_rank_send"));
  simt::ConcurrentLaunch launch(cluster.options("low_latency_missing_rank"));
  for (int r = 0; r < 3; ++r) {
    slot_of[r].assign(size_t(inputs[r].num_tokens) * 2, 0);
    if (r != 1) {
      kernels::LowLatencyDispatchSendArgs<ShmTransport> send;
      send.comm = cluster.comm(r);
      send.x = inputs[r].x.data();
      send.num_tokens = inputs[r].num_tokens;
      send.topk_idx = inputs[r].topk.data();
      send.num_topk = 2;
      send.slot_of = slot_of[r].data();
      kernels::add_low_latency_dispatch_send(senders, send);
    }
    kernels::LowLatencyDispatchRecvArgs<ShmTransport> recv;
    recv.comm = cluster.comm(r);
    recv.comm.timeout_cycles = 50'000'000;  // 50 ms
    recv.recv_x = recv_x[r].data();
    recv.recv_count = recv_count[r].data();
    recv.src_info = src_info[r].data();
    recv.layout_range = layout_range[r].data();
    kernels::add_low_latency_dispatch_recv(launch, recv);
  }
  cluster.run(senders);
  CHECK(launch.try_run().ok());  // the kernels left by themselves
  int timeouts = 0;
  for (int r = 0; r < 3; ++r) {
    std::string const text = error_text(cluster.errors[r]);
    if (cluster.errors[r].code == int32_t(kernels::ErrorCode::kTimeout)) {
      ++timeouts;
      CHECK_CONTAINS(text, "low_latency_dispatch_recv timeout: rank=" + std::to_string(r) +
                               " role=ll_slice_receiver channel=0 peer=1 expected=5 observed=0");
    } else {
      CHECK_CONTAINS(text, "low_latency_dispatch_recv peer_aborted: rank=" + std::to_string(r) + " role=ll_slice_receiver");
    }
    uint64_t const* signals = reinterpret_cast<uint64_t const*>(cluster.rdma_buffers[r] + cluster.layout.signals_buffer_offset());
    CHECK(signals[cluster.layout.abort_signal()] >= 1);  // every rank was told
  }
  CHECK(timeouts >= 1);
}

// An expert id out of range on rank 0: its row sender reports it; rank 1, which waits for that token's
// other row, stops at once with peer_aborted (long before its own 20 s timeout).
EPCOMM_TEST(low_latency_bad_expert_aborts_every_rank) {
  Shape const shape{2, 1, 4, 128, 2};
  Cluster cluster(shape);
  std::vector<uint16_t> x(4 * 128, 0x3f80);
  std::vector<int64_t> topk = {1, 99, 0, -1};
  std::vector<int32_t> slot_of(4, 0);
  std::vector<std::vector<int32_t>> recv_count(2, std::vector<int32_t>(1)), src_info(2, std::vector<int32_t>(8));
  std::vector<std::vector<int64_t>> layout_range(2, std::vector<int64_t>(2));
  std::vector<std::vector<uint16_t>> recv_x(2, std::vector<uint16_t>(8 * 128));
  auto const start = std::chrono::steady_clock::now();
  // rank 1 sends (nothing but its counts); then rank 0 sends while rank 1 receives; then rank 0 receives (each
  // rank's receive after its own send, as in its stream)
  simt::ConcurrentLaunch first(cluster.options("low_latency_bad_expert_rank1_send"));
  simt::ConcurrentLaunch launch(cluster.options("low_latency_bad_expert"));
  simt::ConcurrentLaunch last(cluster.options("low_latency_bad_expert_rank0_recv"));
  for (int r = 0; r < 2; ++r) {
    kernels::LowLatencyDispatchSendArgs<ShmTransport> send;
    send.comm = cluster.comm(r);
    send.x = x.data();
    send.num_tokens = r == 0 ? 2 : 0;
    send.topk_idx = topk.data();
    send.num_topk = 2;
    send.slot_of = slot_of.data();
    kernels::add_low_latency_dispatch_send(r == 1 ? first : launch, send);
    kernels::LowLatencyDispatchRecvArgs<ShmTransport> recv;
    recv.comm = cluster.comm(r);
    recv.comm.timeout_cycles = 20'000'000'000LL;
    recv.recv_x = recv_x[r].data();
    recv.recv_count = recv_count[r].data();
    recv.src_info = src_info[r].data();
    recv.layout_range = layout_range[r].data();
    kernels::add_low_latency_dispatch_recv(r == 1 ? launch : last, recv);
  }
  CHECK(first.try_run().ok());
  CHECK(launch.try_run().ok());
  CHECK(last.try_run().ok());
  double const seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK_CONTAINS(error_text(cluster.errors[0]),
                 "low_latency_dispatch_send bad_input: rank=0 role=ll_row_sender channel=-1 peer=-1 expected=2 observed=99");
  CHECK_CONTAINS(error_text(cluster.errors[1]), "low_latency_dispatch_recv peer_aborted: rank=1 role=ll_slice_receiver channel=0 peer=0");
  CHECK(seconds < 10.0);
}

EPCOMM_TEST(low_latency_layout_and_validation) {
  // Exact sizes: M = 128, H = 7168, R = 16, L = 8 (E = 128) at region offset 1 MiB
  LowLatencyLayout const layout(128, 7168, 16, 8, size_t(1) << 20);
  size_t const message = kernels::align_up(16 + 2 * 7168, 16);
  CHECK_EQ(layout.message_bytes, message);
  CHECK_EQ(layout.num_signals(), 4 * 128 + 1);
  CHECK_EQ(layout.signals_offset, size_t(0));
  CHECK_EQ(layout.generations_offset, kernels::align_up(8 * (4 * 128 + 1), 128));
  CHECK_EQ(layout.slots_offset, layout.generations_offset + 128);  // 4 uint64 generations, 128-aligned
  CHECK_EQ(layout.generation(1, true), (size_t(1) << 20) + layout.generations_offset + 3 * 8);
  CHECK_EQ(layout.count_staging_offset, size_t(0));
  CHECK_EQ(layout.counts_offset, size_t(512));
  CHECK_EQ(layout.dispatch_staging_offset, size_t(1024));
  CHECK_EQ(layout.dispatch_recv_offset, kernels::align_up(1024 + 128 * message, 128));
  CHECK_EQ(layout.combine_send_offset, kernels::align_up(layout.dispatch_recv_offset + size_t(8) * 16 * 128 * message, 128));
  CHECK_EQ(layout.combine_recv_offset, layout.combine_send_offset + size_t(8) * 16 * 128 * 7168 * 2);
  CHECK_EQ(layout.slot_bytes, layout.combine_recv_offset + size_t(128) * 128 * 7168 * 2);
  CHECK_EQ(layout.required_bytes(), layout.slots_offset + 2 * layout.slot_bytes);
  CHECK_EQ(layout.combine_send_buffer(1), (size_t(1) << 20) + layout.slots_offset + layout.slot_bytes + layout.combine_send_offset);
  CHECK_EQ(layout.dispatch_signal(1, 7, 15), 2 * 128 - 1);
  CHECK_EQ(layout.combine_signal(1, 127), 4 * 128 - 1);
  CHECK_EQ(layout.abort_signal(), 4 * 128);
  // Shape limits name the value
  CHECK_CONTAINS(std::string(kernels::validate_low_latency_shape(128, 100, 2, 2)), "hidden=100 must be a positive multiple of 8");
  CHECK_CONTAINS(std::string(kernels::validate_low_latency_shape(1 << 20, 128, 1024, 4)), "rows exceed int32");
  // Per-call checks
  Cluster cluster({2, 2, 4, 256, 2});
  std::vector<uint16_t> x(4 * 256);
  std::vector<int64_t> topk(8, -1);
  std::vector<int32_t> slot_of(8);
  kernels::LowLatencyDispatchSendArgs<ShmTransport> send;
  send.comm = cluster.comm(0);
  send.x = x.data();
  send.topk_idx = topk.data();
  send.slot_of = slot_of.data();
  send.num_topk = 2;
  send.num_tokens = 4;
  CHECK(kernels::validate(send) == nullptr);
  send.num_tokens = 5;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "num_tokens=5 must be in [0, num_max_tokens=4]");
  send.num_tokens = 4;
  send.num_topk = 17;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "num_topk=17 must be in [1, 16]");
  send.num_topk = 2;
  send.use_fp8 = true;
  send.use_ue8m0 = true;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "use_ue8m0 needs use_fp8 and round_scale");
  send.round_scale = true;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "hidden=256 to be a multiple of 512");
  send.use_ue8m0 = false;
  CHECK(kernels::validate(send) == nullptr);
  send.slot = 2;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "slot=2 must be 0 or 1");
  send.slot = 0;
  send.x = reinterpret_cast<char const*>(x.data()) + 2;
  CHECK_CONTAINS(std::string(kernels::validate(send)), "x must be 16-byte aligned");
  Cluster odd({2, 2, 4, 136, 2});
  kernels::LowLatencyDispatchSendArgs<ShmTransport> odd_send = send;
  odd_send.comm = odd.comm(0);
  odd_send.x = x.data();
  odd_send.round_scale = false;
  CHECK_CONTAINS(std::string(kernels::validate(odd_send)), "use_fp8 needs hidden=136 to be a multiple of 128");
  kernels::LowLatencyCombineRecvArgs<ShmTransport> recv;
  recv.comm = cluster.comm(1);
  recv.num_topk = 2;
  recv.comm.rank = 2;
  CHECK_CONTAINS(std::string(kernels::validate(recv)), "rank=2 must be in [0, num_ranks=2)");
}

// The kernels' FP8 pieces against the reference on chosen values (ties, subnormals, saturation).
EPCOMM_TEST(low_latency_fp8_conversion) {
  for (uint32_t bits = 0; bits < 0x44000000u; bits += 0x4007u) {  // every exponent up to 512, many mantissas
    float const value = std::bit_cast<float>(bits);
    CHECK_EQ(int(kernels::float_to_e4m3_bits(value)), int(ref_e4m3(value)));
    CHECK_EQ(int(kernels::float_to_e4m3_bits(-value)), int(ref_e4m3(-value)));
  }
  for (int code = 0; code <= 0x7e; ++code) {  // exact codes and the midpoints between them
    float const value = float(e4m3_value(code));
    CHECK_EQ(int(kernels::float_to_e4m3_bits(value)), code);
    if (code < 0x7e) {
      float const midpoint = float((e4m3_value(code) + e4m3_value(code + 1)) / 2);
      CHECK_EQ(int(kernels::float_to_e4m3_bits(midpoint)), code % 2 == 0 ? code : code + 1);
    }
  }
  CHECK_EQ(int(kernels::float_to_e4m3_bits(1.0e6f)), 0x7e);
  CHECK_EQ(int(kernels::float_to_e4m3_bits(-INFINITY)), 0xfe);
  CHECK_EQ(int(kernels::float_to_e4m3_bits(NAN)) & 0x7f, 0x7f);
  for (float amax : {0.0f, 1.0f, 448.0f, 449.0f, 3.0e4f, 1.0e-4f, 1.00001e-4f, 0.99e-4f, 1.0e-30f, 1.0e-44f, 3.3e38f})
    for (bool round : {false, true})
      CHECK_EQ(std::bit_cast<uint32_t>(kernels::ll_block_scale(amax, round)),
               std::bit_cast<uint32_t>(ref_scale(amax, round)));
}

}  // namespace
