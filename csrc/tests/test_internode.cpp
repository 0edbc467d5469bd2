// The internode kernels (notify, two-hop dispatch, combine) with all ranks of
// all nodes in one process: NVL and RDMA buffers are plain allocations, the
// transport is ShmTransport over them, one grid per rank through
// simt::ConcurrentLaunch. Every output is compared bit for bit with a host
// reference written from the library's contract (reference.py), and the
// transport's byte counters prove what crossed the network. Also built with the
// planted-bug flags of kernels/internode_dispatch.cuh, where these tests must fail.
#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "../common/compat.cuh"
#include "../kernels/internode.hpp"
#include "../kernels/internode_validate.hpp"
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
using test::ref_float_to_bf16;
using test::token_counts;
using transport::LinkClass;
using transport::ShmTransport;

namespace {

// ---- inputs and host reference (the receive order is dispatch_reference.hpp's) -

struct Shape {
  int num_nodes, num_nvl_ranks, num_channels;
  int nvl_ring_tokens, nvl_chunk_tokens, rdma_ring_tokens, rdma_chunk_tokens;
  std::vector<int> num_tokens;  // per rank
  int hidden;                   // elements; dispatch row = hidden bytes (fp8) or 2 * hidden (bf16)
  bool fp8;
  int num_topk = 4, num_local_experts = 2, max_nodes_per_token = 2, rounds = 1;
  uint64_t seed = 1;
  bool fp32_node_partials = false;  // else node partials cross the network as bf16 (the rows' dtype)
  int num_ranks() const { return num_nodes * num_nvl_ranks; }
  test::DispatchShape dispatch_shape() const {
    return {num_local_experts, num_topk, test::row_hidden_bytes(hidden, fp8), test::row_scale_bytes(hidden, fp8)};
  }
};

// Each token picks 1..max_nodes_per_token nodes (a third exactly max_nodes_per_token), then experts only
// on those nodes; about one entry in five is -1.
std::vector<RankTokens> make_inputs(Shape const& shape, uint64_t seed) {
  std::mt19937_64 rng(seed), bytes_rng(seed ^ 0x9e3779b97f4a7c15ull);  // routing does not depend on row sizes
  int const R = shape.num_ranks(), K = shape.num_topk;
  int const experts_per_node = shape.num_nvl_ranks * shape.num_local_experts;
  int const max_nodes = std::min({shape.max_nodes_per_token, shape.num_nodes, K});
  std::vector<RankTokens> data(R);
  for (int r = 0; r < R; ++r) {
    RankTokens& d = data[r];
    test::fill_random_rows(d, shape.num_tokens[r], shape.dispatch_shape(), bytes_rng);
    d.topk_idx.assign(size_t(d.num_tokens) * K, -1);
    d.topk_weights.resize(d.topk_idx.size());
    for (int t = 0; t < d.num_tokens; ++t) {
      bool const exact = rng() % 3 == 0;
      int const num_token_nodes = exact ? max_nodes : 1 + int(rng() % uint64_t(max_nodes));
      std::vector<int> nodes(shape.num_nodes);
      for (int n = 0; n < shape.num_nodes; ++n) nodes[n] = n;
      std::shuffle(nodes.begin(), nodes.end(), rng);
      nodes.resize(num_token_nodes);
      std::vector<int64_t> chosen;
      for (int k = 0; k < K; ++k) {
        // The first num_token_nodes entries cover every chosen node (so "exact" tokens reach them all)
        int const node = k < num_token_nodes ? nodes[k] : nodes[rng() % uint64_t(num_token_nodes)];
        int64_t expert = int64_t(node) * experts_per_node + int64_t(rng() % uint64_t(experts_per_node));
        bool const none = (k >= num_token_nodes || !exact) && rng() % 5 == 0;
        if (none || std::find(chosen.begin(), chosen.end(), expert) != chosen.end()) continue;
        chosen.push_back(expert);
        d.topk_idx[size_t(t) * K + k] = expert;
      }
      for (int k = 0; k < K; ++k) d.topk_weights[size_t(t) * K + k] = float(rng() % 1000) / 997.0f;
    }
  }
  return data;
}

bool token_goes_to(Shape const& shape, RankTokens const& d, int t, int rank) {
  return test::token_goes_to(shape.dispatch_shape(), d, t, rank);
}

bool token_goes_to_node(Shape const& shape, RankTokens const& d, int t, int node) {
  for (int p = 0; p < shape.num_nvl_ranks; ++p)
    if (token_goes_to(shape, d, t, node * shape.num_nvl_ranks + p)) return true;
  return false;
}

int channel_of(int num_tokens, int num_channels, int t) {
  for (int c = 0; c < num_channels; ++c)
    if (t < int(int64_t(num_tokens) * (c + 1) / num_channels)) return c;
  return num_channels - 1;
}

// ---- all ranks' buffers ---------------------------------------------------------

struct Cluster : test::InProcessRanks {
  Shape shape;
  kernels::InternodeConfig config;
  kernels::NvlWorkspace nvl_workspace;
  kernels::RdmaWorkspace rdma_workspace;
  std::vector<std::vector<void*>> node_nvl_buffers;  // [node][local rank]
  std::vector<char*> rdma_buffers;                   // [rank]
  test::LinkByteCounters link_bytes, link_puts;
  // Rows of all time of each network ring, as its sender counts them: dispatch [source rank][channel][node],
  // combine [forwarding rank][channel][node] (where a round's puts start in the ring)
  std::vector<uint64_t> dispatch_ring_rows, combine_ring_rows;

  size_t nvl_bytes = 0, rdma_bytes = 0;  // allocated per rank

  Cluster(Shape const& s, std::optional<uint64_t> seed)
      : InProcessRanks("internode", s.num_ranks(), seed), link_bytes(s.num_ranks()), link_puts(s.num_ranks()) {
    lay_out(s);
    nvl_bytes = nvl_workspace.required_bytes();
    rdma_bytes = rdma_workspace.required_bytes();
    node_nvl_buffers.assign(s.num_nodes, {});
    for (int r = 0; r < s.num_ranks(); ++r) {
      node_nvl_buffers[r / s.num_nvl_ranks].push_back(allocate(nvl_bytes));
      rdma_buffers.push_back(allocate(rdma_bytes));
    }
  }

  // The config and workspaces of `s` (its ranks and nodes those of the buffers, if any).
  void lay_out(Shape const& s) {
    shape = s;
    config.nvl = {s.num_channels, s.nvl_chunk_tokens, s.nvl_ring_tokens};
    config.rdma_chunk_tokens = s.rdma_chunk_tokens;
    config.rdma_ring_tokens = s.rdma_ring_tokens;
    int const dispatch_row = s.dispatch_shape().hidden_bytes + s.dispatch_shape().scale_bytes;
    nvl_workspace = kernels::NvlWorkspace({s.num_nvl_ranks, s.num_local_experts, s.num_topk, std::max(dispatch_row, 2 * s.hidden)},
                                          config.nvl);
    kernels::RdmaWorkspaceShape rdma_shape{s.num_nodes, s.num_nvl_ranks, s.num_local_experts, s.num_topk,
                                           dispatch_row,  s.hidden,        s.max_nodes_per_token};
    if (char const* problem = kernels::validate_rdma_shape(rdma_shape, config)) throw test::CheckFailure(problem);
    rdma_workspace = kernels::RdmaWorkspace(rdma_shape, config);
    // the ring counts restart with the signal bases (zeroed with the buffers)
    dispatch_ring_rows.assign(size_t(s.num_ranks()) * s.num_channels * s.num_nodes, 0);
    combine_ring_rows = dispatch_ring_rows;
  }

  kernels::ShmInternodeComm comm(int rank) {
    kernels::ShmInternodeComm c = comm_for<kernels::ShmInternodeComm>(rank);
    c.num_nvl_ranks = shape.num_nvl_ranks;
    c.config = config;
    c.nvl_workspace = nvl_workspace;
    c.rdma_workspace = rdma_workspace;
    c.nvl_peer_buffers = node_nvl_buffers[rank / shape.num_nvl_ranks].data();
    c.transport = ShmTransport{rank, shape.num_ranks(), shape.num_nvl_ranks, rdma_buffers.data(),
                               rdma_workspace.signals_offset, link_bytes.of_rank(rank), link_puts.of_rank(rank)};
    return c;
  }
};

// The internode kernels also build the forwarders' prefix matrix and peer masks.
struct RankOutputs : test::NormalRankBuffers {
  std::vector<int32_t> forward_prefix;
  std::vector<uint32_t> forward_peer_masks;
};

// What crossed which link in one dispatch and one combine (from the contract).
struct Traffic {
  uint64_t network_pairs = 0, self_pairs = 0;  // (token, destination node) with node != / == the source's
};

Traffic expected_traffic(Shape const& shape, std::vector<RankTokens> const& data) {
  Traffic traffic;
  for (int s = 0; s < shape.num_ranks(); ++s)
    for (int t = 0; t < data[s].num_tokens; ++t)
      for (int n = 0; n < shape.num_nodes; ++n)
        if (token_goes_to_node(shape, data[s], t, n)) ++(n == s / shape.num_nvl_ranks ? traffic.self_pairs : traffic.network_pairs);
  return traffic;
}

// Puts of `rows` consecutive rows from row `first` (of all time) of a ring of `ring_tokens` slots: runs of at
// most `max_run` rows that never wrap, what a sender makes when it never has to wait for free slots. Adds the
// runs the ring's end cut short to `*cut_at_end`.
uint64_t ring_runs(uint64_t first, uint64_t rows, uint64_t max_run, uint64_t ring_tokens, uint64_t* cut_at_end) {
  uint64_t runs = 0;
  while (rows > 0) {
    uint64_t const to_end = ring_tokens - first % ring_tokens;
    uint64_t const take = std::min({rows, max_run, to_end});
    *cut_at_end += take == to_end && take < std::min(rows, max_run);
    ++runs;
    first += take;
    rows -= take;
  }
  return runs;
}

// The network puts of one dispatch (network senders: chunks) and one combine (forwarders: batches) from the
// routing, advancing the cluster's ring counts. `exact` is false when some dispatch ring gets more rows than it
// has slots: its sender then also puts what it staged before each wait, which timing decides, so only
// [lowest, rows] is known.
struct ExpectedPuts {
  uint64_t dispatch = 0, dispatch_rows = 0, combine = 0;
  uint64_t dispatch_cut_at_end = 0, combine_cut_at_end = 0;  // runs the ring's end cut short
  bool exact = true;
};

template <class Cluster>
ExpectedPuts expected_network_puts(Cluster& cluster, std::vector<RankTokens> const& data, int row_bytes) {
  Shape const& shape = cluster.shape;
  int const L = shape.num_nvl_ranks, NN = shape.num_nodes, C = shape.num_channels;
  uint64_t const T = uint64_t(shape.rdma_ring_tokens);
  kernels::RdmaWorkspace const& rdma = cluster.rdma_workspace;
  bool const packed = rdma.dispatch_stride(row_bytes) == rdma.dispatch_put_bytes(row_bytes);
  uint64_t const max_run = packed ? uint64_t(shape.rdma_chunk_tokens) : 1;
  uint64_t const batch = uint64_t(kernels::internode_forwarder_batch_tokens(cluster.config));
  ExpectedPuts puts;
  for (int s = 0; s < shape.num_ranks(); ++s)
    for (int c = 0; c < C; ++c)
      for (int n = 0; n < NN; ++n) {
        uint64_t rows = 0;  // s's tokens of channel c for node n: the dispatch ring (c, node(s)) of (n, local(s))
        for (int t = 0; t < data[s].num_tokens; ++t)
          rows += channel_of(data[s].num_tokens, C, t) == c && token_goes_to_node(shape, data[s], t, n);
        uint64_t& dispatch_base = cluster.dispatch_ring_rows[(size_t(s) * C + c) * NN + n];
        // combine: forwarder (n, local(s)) sends the same rows back, batch by batch, into s's ring (c, n)
        int const forwarder = n * L + s % L;
        uint64_t& combine_base = cluster.combine_ring_rows[(size_t(forwarder) * C + c) * NN + s / L];
        if (n != s / L) {
          puts.dispatch += ring_runs(dispatch_base, rows, max_run, T, &puts.dispatch_cut_at_end);
          puts.dispatch_rows += rows;
          puts.exact = puts.exact && rows <= T;
          for (uint64_t i = 0; i < rows; i += batch)
            puts.combine += ring_runs(combine_base + i, std::min(batch, rows - i), batch, T, &puts.combine_cut_at_end);
        }
        dispatch_base += rows;
        combine_base += rows;
      }
  return puts;
}

struct RoundResult {
  uint64_t dispatch_network_bytes = 0, dispatch_network_payload = 0, combine_network_bytes = 0;
  uint64_t dispatch_network_puts = 0, dispatch_network_rows = 0, combine_network_puts = 0, dispatch_cut_at_end = 0;
  bool puts_exact = false;
};

RoundResult run_round(Cluster& cluster, uint64_t data_seed) {
  Shape const& shape = cluster.shape;
  int const R = shape.num_ranks(), L = shape.num_nvl_ranks, NN = shape.num_nodes, C = shape.num_channels,
            K = shape.num_topk;
  int const hb = shape.dispatch_shape().hidden_bytes, sb = shape.dispatch_shape().scale_bytes;
  int const num_experts = R * shape.num_local_experts, alignment = 1 + int(data_seed % 3);
  std::vector<RankTokens> data = make_inputs(shape, data_seed);
  std::vector<RankOutputs> out(R);
  for (int r = 0; r < R; ++r) test::run_layout(shape.dispatch_shape(), R, data[r], out[r]);
  cluster.link_bytes.take_per_link_class();
  cluster.link_puts.take_per_link_class();

  // notify: counts, barrier, prefix matrices
  cluster.run_on_every_rank("internode_notify", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::InternodeNotifyArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    // the count messages carry a call check too
    test::set_notify_counts(args, out[r], data[r], R, C, shape.num_local_experts, alignment, int64_t(data_seed));
    out[r].forward_prefix.assign(size_t(NN) * (C + 1), -1);
    args.forward_channel_prefix_matrix = out[r].forward_prefix.data();
    kernels::add_internode_notify(launch, args);
  });
  for (int r = 0; r < R; ++r) CHECK_EQ(out[r].call_agreed, 1);
  // Count messages: one per (source, destination on another node)
  {
    std::vector<uint64_t> bytes = cluster.link_bytes.take_per_link_class();
    CHECK_EQ(bytes[int(LinkClass::kNetwork)], uint64_t(R) * (R - L) * cluster.rdma_workspace.count_message_bytes());
    uint64_t const count_puts = cluster.link_puts.take_per_link_class()[int(LinkClass::kNetwork)];
    CHECK_EQ(count_puts, uint64_t(R) * (R - L));
  }
  std::vector<ExpectedReceive> expected;
  for (int r = 0; r < R; ++r) {
    expected.push_back(test::expected_receive(shape.dispatch_shape(), data, r, alignment));
    ExpectedReceive const& e = expected[r];
    int const num_recv = int(e.recv_src_idx.size());
    CHECK_EQ(out[r].recv_rank_prefix[R], num_recv);
    // (source, channel) prefixes from the definition
    int row = 0;
    for (int s = 0; s < R; ++s) {
      CHECK_EQ(out[r].recv_rank_prefix[s], row);
      for (int c = 0; c < C; ++c) {
        CHECK_EQ(out[r].recv_channel_prefix[size_t(s) * (C + 1) + c], row);
        for (int t = 0; t < data[s].num_tokens; ++t)
          row += channel_of(data[s].num_tokens, C, t) == c && token_goes_to(shape, data[s], t, r);
      }
      CHECK_EQ(out[r].recv_channel_prefix[size_t(s) * (C + 1) + C], row);
    }
    // Forwarded rows: rank r forwards rank (m, r % L)'s tokens that reach node r / L
    row = 0;
    for (int m = 0; m < NN; ++m) {
      int const s = m * L + r % L;
      for (int c = 0; c < C; ++c) {
        CHECK_EQ(out[r].forward_prefix[size_t(m) * (C + 1) + c], row);
        for (int t = 0; t < data[s].num_tokens; ++t)
          row += channel_of(data[s].num_tokens, C, t) == c && token_goes_to_node(shape, data[s], t, r / L);
      }
      CHECK_EQ(out[r].forward_prefix[size_t(m) * (C + 1) + C], row);
    }
    out[r].forward_peer_masks.assign(std::max(row, 1), 0xeeeeeeeeu);  // never empty: null means "not given"
    CHECK(out[r].num_recv_tokens_per_expert == e.num_recv_tokens_per_expert);
  }

  // dispatch
  cluster.run_on_every_rank("internode_dispatch", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::InternodeDispatchArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    test::set_dispatch_rows(args, out[r], data[r], shape.dispatch_shape(), num_experts);
    args.max_nodes_per_token = shape.max_nodes_per_token;
    args.forward_channel_prefix_matrix = out[r].forward_prefix.data();
    args.forward_peer_masks = out[r].forward_peer_masks.data();
    kernels::add_internode_dispatch(launch, args);
  });
  for (int r = 0; r < R; ++r) test::check_received_rows(out[r], expected[r], r);
  Traffic const traffic = expected_traffic(shape, data);
  ExpectedPuts const puts = expected_network_puts(cluster, data, hb + sb);
  RoundResult result;
  {
    // Network messages: a put per run of rows (a chunk), not per row
    uint64_t const made = cluster.link_puts.take_per_link_class()[int(LinkClass::kNetwork)];
    result.dispatch_network_puts = made;
    result.dispatch_network_rows = puts.dispatch_rows;
    result.puts_exact = puts.exact;
    result.dispatch_cut_at_end = puts.dispatch_cut_at_end;
    if (puts.exact) {
      CHECK_EQ(made, puts.dispatch);
    } else {
      CHECK(made >= puts.dispatch && made <= puts.dispatch_rows);
    }
    std::vector<uint64_t> bytes = cluster.link_bytes.take_per_link_class();
    uint64_t const record = cluster.rdma_workspace.record_bytes;
    result.dispatch_network_bytes = bytes[int(LinkClass::kNetwork)];
    CHECK_EQ(result.dispatch_network_bytes, traffic.network_pairs * (record + uint64_t(hb + sb)));
    result.dispatch_network_payload = result.dispatch_network_bytes - traffic.network_pairs * record;
    CHECK_EQ(result.dispatch_network_payload, traffic.network_pairs * uint64_t(hb + sb));
    CHECK_EQ(bytes[int(LinkClass::kSelf)], traffic.self_pairs * (record + uint64_t(hb + sb)));
    CHECK_EQ(bytes[int(LinkClass::kNvlink)], uint64_t(0));  // NVLink copies use peer pointers, not the transport
  }

  test::make_expert_outputs(out, shape.hidden, data_seed * 7919 + 1);

  // barrier (resets the NVL rings), then combine
  cluster.run_on_every_rank("internode_barrier", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::InternodeNotifyArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    kernels::add_internode_notify(launch, args);
  });
  cluster.link_bytes.take_per_link_class();
  cluster.link_puts.take_per_link_class();
  cluster.run_on_every_rank("internode_combine", [&](simt::ConcurrentLaunch& launch, int r) {
    RankOutputs& o = out[r];
    kernels::InternodeCombineArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    test::set_combine_rows(args, o, data[r], shape.hidden, K);
    // a rank that received nothing passes null inputs (as Python does): its forwarder still sums its peers'
    args.topk_weights = o.recv_topk_weights.empty() ? nullptr : o.recv_topk_weights.data();
    args.forward_channel_prefix_matrix = o.forward_prefix.data();
    args.forward_peer_masks = o.forward_peer_masks.data();
    args.node_partial_kind = shape.fp32_node_partials ? kernels::ElementKind::kFloat32 : kernels::ElementKind::kBfloat16;
    kernels::add_internode_combine(launch, args);
  });
  {
    std::vector<uint64_t> bytes = cluster.link_bytes.take_per_link_class();
    result.combine_network_bytes = bytes[int(LinkClass::kNetwork)];
    result.combine_network_puts = cluster.link_puts.take_per_link_class()[int(LinkClass::kNetwork)];
    CHECK_EQ(result.combine_network_puts, puts.combine);  // one per batch, two when it wraps the ring
    CHECK_EQ(result.combine_network_bytes,
             traffic.network_pairs * cluster.rdma_workspace.combine_put_bytes(shape.fp32_node_partials ? 4 : 2));
  }
  // Reference: acc = 0; per node n ascending: P = 0, P += float(row_d) for d of n ascending, P rounded to
  // bf16 unless fp32_node_partials (x only; weights stay fp32); acc += P; bf16(acc)
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < data[s].num_tokens; ++t) {
      std::vector<std::pair<int, int>> const rows = test::received_rows_of(expected, s, t);  // (rank d, row on d)
      for (int j = 0; j <= shape.hidden; ++j) {  // j == hidden: the weights
        for (int k = 0; k < (j == shape.hidden ? K : 1); ++k) {
          float acc = 0.0f;
          for (int n = 0; n < NN; ++n) {
            float partial = 0.0f;
            bool any = false;
            for (auto [d, m] : rows) {
              if (d / L != n) continue;
              any = true;
              partial = partial + (j < shape.hidden ? ref_bf16_to_float(out[d].expert_out[size_t(m) * shape.hidden + j])
                                                    : out[d].recv_topk_weights[size_t(m) * K + k]);
            }
            if (any && j < shape.hidden && !shape.fp32_node_partials) partial = ref_bf16_to_float(ref_float_to_bf16(partial));
            if (any) acc = acc + partial;
          }
          if (j < shape.hidden) {
            test::check_combined_element(out[s].combined_x[size_t(t) * shape.hidden + j], ref_float_to_bf16(acc), s, t,
                                         j);
          } else {
            CHECK_EQ(std::bit_cast<uint32_t>(out[s].combined_topk_weights[size_t(t) * K + k]), std::bit_cast<uint32_t>(acc));
          }
        }
      }
    }
  }
  return result;
}

RoundResult run_shape(Shape const& shape, std::optional<uint64_t> fuzz_seed = std::nullopt) {
  Cluster cluster(shape, fuzz_seed);
  RoundResult result;
  for (int round = 0; round < shape.rounds; ++round) result = run_round(cluster, shape.seed * 100 + round);
  return result;
}

int const kTokens = test::kSanitized ? 8 : 48;

// Shape fields: nodes, L, channels, nvl ring, nvl chunk, rdma ring, rdma chunk, tokens, hidden, fp8,
// topk, local experts, max nodes per token, rounds, seed.
EPCOMM_TEST(internode_2x2) {
  run_shape({2, 2, 2, 4, 2, 4, 2, token_counts(4, kTokens, 1), 128, false, 4, 2, 2, 2, 11});
  run_shape({2, 2, 2, 4, 2, 4, 2, token_counts(4, kTokens, 1), 128, false, 4, 2, 2, 2, 11, /*fp32_node_partials=*/true});
  run_shape({2, 2, 1, 3, 1, 3, 1, token_counts(4, kTokens, 2), 128, true, 3, 3, 2, 1, 12});
}

EPCOMM_TEST(internode_4x2) {
  run_shape({4, 2, 2, 4, 2, 5, 2, token_counts(8, kTokens, 3), 128, true, 6, 2, 4, 1, 21});
  if (!test::kSanitized) run_shape({4, 2, 3, 6, 3, 4, 1, token_counts(8, kTokens, 4), 256, false, 4, 1, 3, 2, 22});
}

EPCOMM_TEST(internode_2x4) {
  run_shape({2, 4, 2, 4, 1, 4, 2, token_counts(8, kTokens, 5), 128, false, 4, 2, 2, 1, 31});
  if (!test::kSanitized) run_shape({2, 4, 1, 5, 2, 3, 3, token_counts(8, kTokens, 6), 128, true, 5, 2, 1, 1, 32});
}

// Rings at least as long as a round's rows: every network sender puts its rows in chunks of rdma_chunk_tokens
// that never wrap (exactly as many puts as ring_runs says, far fewer than rows), the combine forwarders a batch
// at a time; the second round starts mid-ring, so some runs end at the ring's end (a ring of 24 slots, up to 20
// rows per ring and round). Bytes stay the rows' exactly (run_round checks them).
EPCOMM_TEST(internode_network_puts_are_chunks) {
  Shape shape{4, 2, 2, 4, 1, 24, 8, token_counts(8, 40, 11), 128, false, 4, 2, 2, 1, 47};
  Cluster cluster(shape, std::nullopt);
  uint64_t cut_at_end = 0;
  for (uint64_t round = 1; round <= 2; ++round) {
    RoundResult const result = run_round(cluster, 100 + round);
    cut_at_end += result.dispatch_cut_at_end;
    CHECK(result.puts_exact);
    CHECK(result.dispatch_network_rows > 0 && 3 * result.dispatch_network_puts < result.dispatch_network_rows);
    CHECK(result.combine_network_puts < result.dispatch_network_rows);
  }
  CHECK(cut_at_end > 0);  // the wrap rule was exercised, and counted exactly
}

// One node through the internode path: every "network" put is a put to self.
EPCOMM_TEST(internode_1x4) {
  run_shape({1, 4, 2, 4, 2, 4, 2, token_counts(4, kTokens, 9), 128, true, 4, 2, 1, 1, 45});
}

EPCOMM_TEST(internode_8x1) {
  run_shape({8, 1, 2, 4, 2, 4, 2, token_counts(8, kTokens, 7), 128, false, 4, 3, 4, 1, 41});
}

// The widest node count the kernels take: 32 nodes (node masks use bit 31; sender blocks are 32 warps).
EPCOMM_TEST(internode_32x1) {
  if (test::kSanitized) throw test::Skipped("32 ranks x 3 blocks x 1024 threads: too slow under a sanitizer");
  run_shape({32, 1, 1, 4, 2, 4, 2, token_counts(32, 6, 10), 128, false, 4, 1, 4, 1, 46});
}

// The widest node the kernels take: 31 ranks (forwarder block: 31 forwarder warps + the coordinator).
EPCOMM_TEST(internode_1x31) {
  if (test::kSanitized) throw test::Skipped("31 ranks x 3 blocks x 1024 threads: too slow under a sanitizer");
  run_shape({1, 31, 1, 4, 2, 4, 2, token_counts(31, 6, 11), 128, true, 4, 1, 1, 1, 47});
}

// FP8 rows (H data bytes + 4 * H / 128 scale bytes) against bf16 rows (2 * H) under the same routing:
// the network payload shrinks by exactly that ratio.
EPCOMM_TEST(internode_fp8_network_payload_ratio) {
  Shape shape{2, 2, 2, 4, 2, 4, 2, token_counts(4, kTokens, 8), 256, false, 4, 2, 2, 1, 51};
  RoundResult const bf16 = run_shape(shape);
  shape.fp8 = true;
  RoundResult const fp8 = run_shape(shape);
  CHECK(bf16.dispatch_network_payload > 0);
  uint64_t const H = uint64_t(shape.hidden);
  CHECK_EQ(fp8.dispatch_network_payload * (2 * H), bf16.dispatch_network_payload * (H + 4 * H / 128));
  CHECK_EQ(fp8.combine_network_bytes, bf16.combine_network_bytes);  // combine moves fp32 partials either way
}

EPCOMM_TEST(internode_fuzzed_schedules) {
  int const tokens = test::kSanitized ? 6 : 10;
  for (uint64_t seed = 1; seed <= 10; ++seed) {
    int const channels = test::kSanitized ? 1 : 2;
    run_shape({2, 2, channels, 3, 1, 3, 2, token_counts(4, tokens, seed), 128, seed % 2 == 0, 3, 2, 2, 1, 60 + seed}, seed);
    if (!test::kSanitized || seed % 3 == 0)
      run_shape({4, 1, 1, 4, 2, 3, 1, token_counts(4, tokens, seed + 50), 128, seed % 2 == 1, 4, 2, 3, 1, 80 + seed}, seed);
  }
}

// One internode notify without counts per rank, with the given call-check fields; each rank's
// call_agreed (-1: not written). Checks the network bytes: a 16-byte header per (source, remote rank)
// that sends one, nothing for a bare signal.
std::vector<int32_t> run_call_check(Cluster& cluster, std::vector<int> const& flags, std::vector<int64_t> const& digests) {
  int const R = cluster.shape.num_ranks(), L = cluster.shape.num_nvl_ranks;
  cluster.link_bytes.take_per_link_class();
  std::vector<int32_t> agreed(size_t(R), -1);
  uint64_t expected_bytes = 0;
  cluster.run_on_every_rank("internode_notify_call_check", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::InternodeNotifyArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    args.call_digest = digests[size_t(r)];
    args.call_flags = flags[size_t(r)];
    bool const checks = args.call_flags != kernels::kNoCallCheck;
    args.call_agreed = checks ? &agreed[size_t(r)] : nullptr;
    if (checks) expected_bytes += uint64_t(R - L) * sizeof(kernels::CallHeader);
    kernels::add_internode_notify(launch, args);
  });
  uint64_t const network_bytes = cluster.link_bytes.take_per_link_class()[int(LinkClass::kNetwork)];
  CHECK_EQ(network_bytes, expected_bytes);
  return agreed;
}

EPCOMM_TEST(internode_call_check) {
  for (auto [nodes, nvl_ranks] : {std::pair{2, 2}, std::pair{4, 1}}) {
    Cluster cluster({nodes, nvl_ranks, 1, 4, 2, 4, 2, std::vector<int>(size_t(nodes * nvl_ranks), 0), 128, false},
                    std::nullopt);
    test::check_call_verdicts(nodes * nvl_ranks, [&](auto const& flags, auto const& digests) {
      return run_call_check(cluster, flags, digests);
    });
  }
}

// ---- re-layout with signals that outlive the buffers (NCCL GIN keeps them in the communicator) ----

// A re-layout as the kernel backends do it (SimDispatchBackend._relayout), on a transport whose signals
// survive the zeroing of the buffers: with `reset`, a notify in the current layout zeroes every rank's
// signals once the adds due to them have landed (reset_signals); then every buffer is zeroed except the
// signal table, which sits at the start of the RDMA buffer in every layout (as GIN keeps its own), the
// buffers are laid out for `next` (no larger than they are) and epochs restart at 0 (their counters
// were zeroed with the NVL buffers).
void relayout(Cluster& cluster, Shape const& next, bool reset) {
  if (reset) {
    cluster.run_on_every_rank("internode_notify_reset_signals", [&](simt::ConcurrentLaunch& launch, int r) {
      kernels::InternodeNotifyArgs<ShmTransport> args;
      args.comm = cluster.comm(r);
      args.reset_signals = true;
      kernels::add_internode_notify(launch, args);
    });
  }
  size_t const table_end = cluster.rdma_workspace.signal_bases_offset;  // signals: [0, table_end)
  for (auto& node : cluster.node_nvl_buffers)
    for (void* buffer : node) std::memset(buffer, 0, cluster.nvl_bytes);
  for (char* buffer : cluster.rdma_buffers) std::memset(buffer + table_end, 0, cluster.rdma_bytes - table_end);
  cluster.lay_out(next);
  CHECK(cluster.nvl_workspace.required_bytes() <= cluster.nvl_bytes);
  CHECK(cluster.rdma_workspace.required_bytes() <= cluster.rdma_bytes);
  CHECK_EQ(cluster.rdma_workspace.signals_offset, size_t(0));
}

uint64_t const* signal_table(Cluster const& cluster, int rank) {
  return reinterpret_cast<uint64_t const*>(cluster.rdma_buffers[size_t(rank)] + cluster.rdma_workspace.signals_offset);
}

// Rounds in one layout, a re-layout to fewer channels and a shorter network ring (ring signals move to
// other indices), rounds again: every round checked against the host reference; after the reset every
// signal of every rank is 0.
EPCOMM_TEST(internode_relayout_resets_persistent_signals) {
  Shape wide{2, 2, 3, 4, 2, 5, 2, token_counts(4, kTokens, 5), 128, false, 4, 2, 2, 1, 41};
  Shape narrow = wide;
  narrow.num_channels = 2;
  narrow.rdma_ring_tokens = 4;
  Cluster cluster(wide, std::nullopt);
  run_round(cluster, 1);
  run_round(cluster, 2);
  int const old_signals = cluster.rdma_workspace.num_signals();
  relayout(cluster, narrow, /*reset=*/true);
  for (int r = 0; r < wide.num_ranks(); ++r)
    for (int i = 0; i < old_signals; ++i) CHECK_EQ(signal_table(cluster, r)[i], uint64_t(0));
  run_round(cluster, 3);
  run_round(cluster, 4);
}

// What the reset prevents: after a re-layout without it, a rank's first notify passes its barrier on
// the stale signals of the old layout, alone (rank 1, on the other node, never launches); after one
// with it, the same notify waits for rank 1 and times out naming it.
EPCOMM_TEST(internode_relayout_without_reset_passes_a_barrier_alone) {
  Shape wide{2, 1, 3, 4, 2, 5, 2, {6, 6}, 128, false, 2, 2, 1, 1, 43};
  Shape narrow = wide;
  narrow.num_channels = 2;
  for (bool reset : {false, true}) {
    Cluster cluster(wide, std::nullopt);
    run_round(cluster, 5);
    relayout(cluster, narrow, reset);
    kernels::InternodeNotifyArgs<ShmTransport> args;
    args.comm = cluster.comm(0);
    if (reset) {
      CHECK_CONTAINS(cluster.run_alone_until_timeout("internode_notify_after_reset", args, kernels::add_internode_notify),
                     "role=internode_notify_barrier channel=-1 peer=1 expected=1 observed=0");
    } else {
      simt::ConcurrentLaunch launch(cluster.options("internode_notify_on_stale_signals"));
      kernels::add_internode_notify(launch, args);
      CHECK(launch.try_run().ok());
      CHECK_EQ(cluster.errors[0].code, 0);  // passed without rank 1
    }
  }
}

// A CUDA graph replays a notify with the arguments it was captured with; across nodes the barrier is
// transport signals counted of all time, so each replay must wait for one more (the epoch counted on
// the device, epoch.cuh). Three replays on both ranks (one per node), then rank 0 alone: it waits for
// rank 1's fourth add and times out naming it.
EPCOMM_TEST(internode_notify_replayed_with_its_arguments_is_a_new_barrier_each_time) {
  Shape shape{2, 1, 1, 4, 2, 4, 2, {4, 4}, 128, false, 2, 2, 1, 1, 78};
  Cluster cluster(shape, std::nullopt);
  std::vector<kernels::InternodeNotifyArgs<ShmTransport>> captured(2);
  for (int r = 0; r < 2; ++r) captured[size_t(r)].comm = cluster.comm(r);
  for (int64_t replay = 1; replay <= 3; ++replay) {
    cluster.run_on_every_rank("internode_notify_replay", [&](simt::ConcurrentLaunch& launch, int r) {
      kernels::add_internode_notify(launch, captured[size_t(r)]);
    });
    for (int r = 0; r < 2; ++r)
      CHECK_EQ(*cluster.nvl_workspace.epoch_counter(cluster.node_nvl_buffers[size_t(r)][0]), replay);
  }
  CHECK_CONTAINS(
      cluster.run_alone_until_timeout("internode_notify_replay_missing_rank", captured[0], kernels::add_internode_notify),
      "role=internode_notify_barrier channel=-1 peer=1 expected=4 observed=3");
}

// A rank that never launches: a rank of another node waits for it and names it.
EPCOMM_TEST(internode_timeout_names_the_missing_peer) {
  Shape shape{2, 1, 1, 4, 2, 4, 2, {4, 4}, 128, false, 2, 2, 1, 1, 77};
  Cluster cluster(shape, std::nullopt);
  kernels::InternodeNotifyArgs<ShmTransport> args;
  args.comm = cluster.comm(0);
  CHECK_CONTAINS(cluster.run_alone_until_timeout("internode_notify_missing_rank", args, kernels::add_internode_notify),
                 "internode_notify timeout: rank=0 role=internode_notify_barrier channel=-1 peer=1 expected=1 observed=0");
  CHECK_EQ(*cluster.nvl_workspace.abort_flag(cluster.node_nvl_buffers[0][0]), 1);
  // ...and its watcher carried the alarm to the other node's abort signal
  uint64_t const* signals = reinterpret_cast<uint64_t const*>(cluster.rdma_buffers[1] + cluster.rdma_workspace.signals_offset);
  CHECK_EQ(signals[cluster.rdma_workspace.abort_signal()], uint64_t(1));
}

// A failure on one node ends the waits on the other node at once (the abort watchers), long before
// their own timeout: rank 0 (node 0) rejects a token routed to 2 nodes with max_nodes_per_token = 1;
// rank 1 (node 1) waits for rows from it and must stop with peer_aborted.
EPCOMM_TEST(internode_abort_reaches_other_nodes) {
  Cluster cluster({2, 1, 1, 4, 2, 4, 2, {3, 0}, 128, false, 2, 1, 1, 1, 90}, std::nullopt);
  std::vector<std::vector<uint8_t>> in_rank = {std::vector<uint8_t>(3 * 2, 1), {}};
  std::vector<uint8_t> x(3 * 256, 1);
  std::vector<int64_t> topk = {0, 1, 0, 1, 0, 1};
  std::vector<std::vector<int32_t>> rank_prefix(2, std::vector<int32_t>(3)), prefix(2, std::vector<int32_t>(2 * 2)),
      forward(2, std::vector<int32_t>(2 * 2));
  long long const timeout = 20'000'000'000LL;  // 20 s: the test fails on time if the alarm does not travel
  cluster.run_on_every_rank("internode_notify_abort", [&](simt::ConcurrentLaunch& launch, int r) {
    kernels::InternodeNotifyArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    args.exchange_counts = true;
    args.is_token_in_rank = reinterpret_cast<bool const*>(in_rank[r].data());
    args.num_tokens = r == 0 ? 3 : 0;
    args.recv_rank_prefix = rank_prefix[r].data();
    args.recv_channel_prefix_matrix = prefix[r].data();
    args.forward_channel_prefix_matrix = forward[r].data();
    kernels::add_internode_notify(launch, args);
  });
  CHECK_EQ(forward[1][1], 3);  // rank 1 expects 3 rows from node 0
  auto const start = std::chrono::steady_clock::now();
  simt::ConcurrentLaunch launch(cluster.options("internode_dispatch_abort"));
  for (int r = 0; r < 2; ++r) {
    kernels::InternodeDispatchArgs<ShmTransport> args;
    args.comm = cluster.comm(r);
    args.comm.timeout_cycles = timeout;
    args.x = x.data();
    args.hidden_bytes = 256;
    args.topk_idx = topk.data();
    args.num_topk = 2;
    args.num_experts = 2;
    args.num_tokens = r == 0 ? 3 : 0;
    args.max_nodes_per_token = 1;
    args.is_token_in_rank = reinterpret_cast<bool const*>(in_rank[r].data());
    args.recv_channel_prefix_matrix = prefix[r].data();
    args.forward_channel_prefix_matrix = forward[r].data();
    kernels::add_internode_dispatch(launch, args);
  }
  CHECK(launch.try_run().ok());
  double const seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK_CONTAINS(error_text(cluster.errors[0]), "internode_dispatch bad_routing: rank=0 role=network_sender");
  CHECK_EQ(cluster.errors[1].code, int32_t(kernels::ErrorCode::kPeerAborted));
  CHECK_CONTAINS(error_text(cluster.errors[1]), "internode_dispatch peer_aborted: rank=1 role=");
  CHECK(seconds < 10.0);
}

// A token routed to more nodes than the dispatch allows: the network sender reports it.
EPCOMM_TEST(internode_rejects_tokens_beyond_max_nodes) {
  Shape shape{4, 1, 1, 4, 2, 4, 2, {3, 3, 3, 3}, 128, false, 4, 1, 4, 1, 78};
  kernels::InternodeConfig config;
  config.nvl = {1, 2, 4};
  kernels::RdmaWorkspace ws({4, 1, 1, 4, 256, 128, 2}, config);
  kernels::InternodeDispatchArgs<ShmTransport> args;
  args.comm.num_ranks = 4;
  args.comm.config = config;
  args.comm.rdma_workspace = ws;
  args.comm.nvl_workspace = kernels::NvlWorkspace({1, 1, 4, 256}, config.nvl);
  int dummy = 0;
  void* buffers[1] = {&dummy};
  args.comm.nvl_peer_buffers = buffers;
  args.hidden_bytes = 256;
  args.max_nodes_per_token = 3;  // the buffers were sized for 2
  CHECK_CONTAINS(std::string(kernels::validate(args)), "max_nodes_per_token=3 must be in [1, 2]");
  // On the device: every token of rank 0 goes to all 4 nodes, the routing bound says 2
  Cluster cluster({4, 1, 1, 4, 2, 4, 2, {3, 0, 0, 0}, 128, false, 4, 1, 2, 1, 79}, std::nullopt);
  std::vector<uint8_t> in_rank(3 * 4, 1);
  std::vector<uint8_t> x(3 * 256, 1);
  std::vector<int64_t> topk(3 * 4, 0);
  std::vector<int32_t> prefix(4 * 2, 0), forward(4 * 2, 0);
  simt::ConcurrentLaunch launch(cluster.options("internode_bad_routing"));
  kernels::InternodeDispatchArgs<ShmTransport> bad;
  bad.comm = cluster.comm(0);
  bad.comm.timeout_cycles = 50'000'000;
  bad.x = x.data();
  bad.hidden_bytes = 256;
  bad.topk_idx = topk.data();
  bad.num_topk = 4;
  bad.num_experts = 4;
  bad.num_tokens = 3;
  bad.max_nodes_per_token = 2;
  bad.is_token_in_rank = reinterpret_cast<bool const*>(in_rank.data());
  bad.recv_channel_prefix_matrix = prefix.data();
  bad.forward_channel_prefix_matrix = forward.data();
  kernels::add_internode_dispatch(launch, bad);
  CHECK(launch.try_run().ok());
  CHECK_CONTAINS(error_text(cluster.errors[0]),
                 "internode_dispatch bad_routing: rank=0 role=network_sender channel=0 peer=-1 expected=2 observed=4");
}

struct SixteenWarpTransport : ShmTransport {
  static constexpr int kMaxBlockWarps = 16;
};

EPCOMM_TEST(internode_workspace_and_validation) {
  // 32 nodes x 8 ranks: every region disjoint, in order, aligned
  kernels::InternodeConfig config;
  config.nvl = {4, 4, 8};
  config.rdma_chunk_tokens = 4;
  config.rdma_ring_tokens = 16;
  kernels::RdmaWorkspaceShape shape{32, 8, 1, 8, 7168 + 224, 7168, 4};
  CHECK(kernels::validate_rdma_shape(shape, config) == nullptr);
  kernels::RdmaWorkspace ws(shape, config);
  CHECK_EQ(ws.num_ranks, 256);
  CHECK_EQ(ws.num_signals(), 256 + 4 * 4 * 32 + 1);
  CHECK_EQ(ws.abort_signal(), 256 + 4 * 4 * 32);
  CHECK(ws.signals_offset < ws.signal_bases_offset && ws.signal_bases_offset < ws.counts_offset &&
        ws.counts_offset < ws.count_staging_offset && ws.count_staging_offset < ws.finished_warps_offset &&
        ws.finished_warps_offset < ws.forwarder_progress_offset &&
        ws.forwarder_progress_offset < ws.dispatch_staging_offset && ws.dispatch_staging_offset < ws.dispatch_rings_offset &&
        ws.dispatch_rings_offset < ws.combine_staging_offset && ws.combine_staging_offset < ws.combine_rings_offset);
  CHECK_EQ(ws.dispatch_rings_offset % 128, size_t(0));
  CHECK_EQ(ws.record_bytes, size_t(8 + 8 * 12));
  CHECK_EQ(ws.dispatch_slot_bytes, kernels::align_up(8 + 8 * 12 + 7168 + 224, 16));
  CHECK_EQ(ws.combine_slot_bytes, kernels::align_up(4 * 8, 16) + kernels::align_up(4 * 7168, 16));
  CHECK_EQ(ws.combine_put_bytes(2), size_t(4 * 8 + 2 * 7168));
  size_t const ring_slots = size_t(4) * 32 * 16;
  CHECK_EQ(ws.required_bytes(), kernels::align_up(ws.combine_rings_offset + ring_slots * ws.combine_slot_bytes, 128));
  // Rows pack at the call's stride inside a ring sized for the largest slot: bf16 rows without scales need no
  // padding; a row of 4 (mod 8) bytes is padded to 8 for the int64 ids (and then travels alone)
  size_t const stride = ws.dispatch_stride(7168);
  CHECK_EQ(stride, ws.dispatch_put_bytes(7168));
  CHECK_EQ(ws.dispatch_stride(7172), ws.dispatch_put_bytes(7172) + 4);
  CHECK_EQ(ws.dispatch_ring_slot(3, 31, 16 + 15, stride),
           ws.dispatch_rings_offset + (3 * 32 + 31) * 16 * ws.dispatch_slot_bytes + 15 * stride);
  CHECK_EQ(ws.dispatch_ring_slot(3, 31, 2 * 16 + 15, stride), ws.dispatch_ring_slot(3, 31, 15, stride));  // wraps
  size_t const largest = ws.dispatch_stride(7168 + 224), ring_begin = ws.dispatch_ring_slot(3, 31, 0, largest);
  CHECK(ws.dispatch_ring_slot(3, 31, 15, largest) + largest <= ring_begin + 16 * ws.dispatch_slot_bytes);  // fits
  CHECK_EQ(ws.combine_stride(2), ws.combine_put_bytes(2));
  // Limits name the value and the rule
  CHECK(kernels::validate_rdma_shape({33, 8, 1, 8, 64, 32, 4}, config) != nullptr);
  CHECK(kernels::validate_rdma_shape({4, 8, 1, 8, 64, 32, 5}, config) != nullptr);  // max_nodes > num_nodes
  kernels::InternodeDispatchArgs<ShmTransport> args;
  args.comm.num_ranks = 256;
  args.comm.num_nvl_ranks = 32;
  CHECK_CONTAINS(std::string(kernels::validate(args)), "num_nvl_ranks=32 must be in [1, 31]");
  args.comm.num_nvl_ranks = 8;
  args.comm.num_ranks = 264;
  CHECK_CONTAINS(std::string(kernels::validate(args)), "num_nodes=33 must be <= 32");
  // A transport whose kernels are built for 16-warp blocks (as GinTransport) refuses shapes needing more
  kernels::InternodeDispatchArgs<SixteenWarpTransport> narrow;
  narrow.comm.num_nvl_ranks = 8;
  narrow.comm.num_ranks = 17 * 8;
  CHECK_CONTAINS(std::string(kernels::validate(narrow)),
                 "17 nodes x 8 ranks need 17 warps per block; this transport's kernels are built for at most 16");
  CHECK_EQ(kernels::max_block_warps<ShmTransport>(), 32);
}

}  // namespace
