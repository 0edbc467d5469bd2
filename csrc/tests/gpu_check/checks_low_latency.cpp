// The low-latency kernels (dispatch send/receive, combine send/receive) on R fake ranks of one device, over
// ShmTransport on device memory (what the cuda runtime uses on one node: puts are stores through a device
// pointer into another rank's region, signals are system-scope atomics there). Each phase is one step: every
// rank's send grid, then every rank's receive grid, as the hook splits them. bf16 rows; against a host
// reference written from the contract (csrc/kernels/low_latency.hpp): per-expert slices in source-rank order
// holding each source's tokens in token order, recv_count and layout_range, and combine of identity experts
// = bf16(sum over valid k ascending of w * x, in fp32, one rounding). Two rounds, so the second runs on the
// other buffer slot with every generation counted on the device.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "checks.hpp"
#include "fake_cluster.hpp"
#include "intranode_round.hpp"

namespace epcomm::gpu_check {

namespace {

struct LlRank {
  int num_tokens = 0;
  std::vector<uint16_t> x;     // [N, H] bf16
  std::vector<int64_t> topk;   // [N, K], -1 = none
  std::vector<float> weights;  // [N, K]
  DeviceBuffer region, x_device, topk_device, weights_device, slot_of, recv_x, recv_count, src_info, layout_range,
      combined;
};

// Token counts from 0 to M (one rank full, one empty), distinct experts per token, about one in five -1.
std::vector<LlRank> make_ranks(int R, int M, int H, int K, int E, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<LlRank> ranks(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    LlRank& rank = ranks[size_t(r)];
    rank.num_tokens = r == 0 ? M : r == R / 2 ? 0 : int(rng() % uint64_t(M + 1));
    rank.x.resize(size_t(rank.num_tokens) * size_t(H));
    for (uint16_t& v : rank.x) v = test::ref_float_to_bf16(float(int(rng() % 2001) - 1000) / 64.0f);
    rank.topk.assign(size_t(rank.num_tokens) * size_t(K), -1);
    rank.weights.resize(rank.topk.size());
    for (int t = 0; t < rank.num_tokens; ++t) {
      std::vector<int64_t> experts(static_cast<size_t>(E));
      for (int e = 0; e < E; ++e) experts[size_t(e)] = e;
      std::shuffle(experts.begin(), experts.end(), rng);
      for (int k = 0; k < K; ++k) {
        if (rng() % 5 != 0) rank.topk[size_t(t) * size_t(K) + size_t(k)] = experts[size_t(k)];
        rank.weights[size_t(t) * size_t(K) + size_t(k)] = float(int(rng() % 2001) - 1000) / 997.0f;
      }
    }
  }
  return ranks;
}

bool routes_to(LlRank const& rank, int K, int t, int64_t expert) {
  for (int k = 0; k < K; ++k)
    if (rank.topk[size_t(t) * size_t(K) + size_t(k)] == expert) return true;
  return false;
}

Verdict low_latency_rounds(Device& device, Scale const& scale) {
  int const R = scale.ll_ranks, M = scale.ll_max_tokens, H = scale.hidden, K = scale.num_topk;
  int const E = std::max(scale.num_experts / R, 1) * R, E_loc = E / R;
  int64_t const rows_per_expert = int64_t(R) * M;
  double const timeout_s = scale.kernel_timeout_s, limit_s = host_limit_s(timeout_s);
  kernels::LowLatencySpec spec;
  spec.num_max_tokens = M;
  spec.hidden = H;
  spec.num_local_experts = E_loc;
  spec.num_nvl_ranks = R;
  kernels::LowLatencyLayout const layout = kernels::low_latency_layout(spec, R);
  std::vector<LlRank> ranks = make_ranks(R, M, H, K, E, 61);
  std::vector<char*> regions;
  for (LlRank& rank : ranks) {
    rank.region = DeviceBuffer(device, layout.required_bytes());
    regions.push_back(rank.region.get<char>());
    rank.x_device = upload(device, rank.x);
    rank.topk_device = upload(device, rank.topk);
    rank.weights_device = upload(device, rank.weights);
  }
  DeviceBuffer const table = upload(device, regions);
  ErrorSlots const slots(device, R);
  auto const comm = [&](int r) {
    kernels::LowLatencyComm<Shm> c;
    c.rank = r;
    c.num_ranks = R;
    c.layout = layout;
    c.transport = Shm{r, R, R, table.get<char* const>(), layout.signals_buffer_offset(), nullptr};
    c.error = slots.kernel_view(r);
    c.timeout_cycles = (long long)(timeout_s * device.clock_ticks_per_second());
    return c;
  };
  std::vector<int> const all = all_ranks(R);
  double dispatch_s = 0, combine_s = 0;
  for (int round = 0; round < 2; ++round) {
    int const slot = round % 2;
    for (LlRank& rank : ranks) {
      rank.slot_of = sentinel_filled<int32_t>(device, std::max(rank.topk.size(), size_t(1)), -7);
      rank.recv_x = sentinel_filled<uint16_t>(device, size_t(E_loc) * size_t(rows_per_expert) * size_t(H), 0xeeee);
      rank.recv_count = sentinel_filled<int32_t>(device, size_t(E_loc), -1);
      rank.src_info = sentinel_filled<int32_t>(device, size_t(E_loc) * size_t(rows_per_expert), -1);
      rank.layout_range = sentinel_filled<int64_t>(device, size_t(E_loc) * size_t(R), -1);
      rank.combined = sentinel_filled<uint16_t>(device, std::max(rank.x.size(), size_t(1)), 0xeeee);
    }
    dispatch_s += run_step(device, slots, "low_latency_dispatch_send", all, limit_s, [&](int r) {
      kernels::LowLatencyDispatchSendArgs<Shm> args;
      args.comm = comm(r);
      args.slot = slot;
      args.x = ranks[size_t(r)].x_device.get<void const>();
      args.num_tokens = ranks[size_t(r)].num_tokens;
      args.topk_idx = ranks[size_t(r)].topk_device.get<int64_t const>();
      args.num_topk = K;
      args.slot_of = ranks[size_t(r)].slot_of.get<int32_t>();
      device.launch(r, args);
    }).seconds;
    dispatch_s += run_step(device, slots, "low_latency_dispatch_recv", all, limit_s, [&](int r) {
      kernels::LowLatencyDispatchRecvArgs<Shm> args;
      args.comm = comm(r);
      args.slot = slot;
      args.recv_x = ranks[size_t(r)].recv_x.get();
      args.recv_count = ranks[size_t(r)].recv_count.get<int32_t>();
      args.src_info = ranks[size_t(r)].src_info.get<int32_t>();
      args.layout_range = ranks[size_t(r)].layout_range.get<int64_t>();
      device.launch(r, args);
    }).seconds;
    // Each (local expert j, source s) slice: s's tokens routed to j's expert, ascending, rows copied bit for bit
    for (int r = 0; r < R; ++r) {
      LlRank const& mine = ranks[size_t(r)];
      std::vector<int32_t> const count = download<int32_t>(device, mine.recv_count, size_t(E_loc));
      std::vector<int64_t> const range = download<int64_t>(device, mine.layout_range, size_t(E_loc) * size_t(R));
      std::vector<int32_t> const src_info = download<int32_t>(device, mine.src_info, size_t(E_loc) * size_t(rows_per_expert));
      std::vector<uint16_t> const recv_x =
          download<uint16_t>(device, mine.recv_x, size_t(E_loc) * size_t(rows_per_expert) * size_t(H));
      for (int j = 0; j < E_loc; ++j) {
        int64_t const expert = int64_t(r) * E_loc + j;
        int64_t begin = 0;
        for (int s = 0; s < R; ++s) {
          std::vector<int> tokens;
          for (int t = 0; t < ranks[size_t(s)].num_tokens; ++t)
            if (routes_to(ranks[size_t(s)], K, t, expert)) tokens.push_back(t);
          int64_t const want = begin << 32 | int64_t(tokens.size());
          if (range[size_t(j) * size_t(R) + size_t(s)] != want)
            throw CheckFailed("low_latency_dispatch: rank " + std::to_string(r) + " expert " + std::to_string(j) +
                              " source " + std::to_string(s) + ": layout_range " +
                              std::to_string(range[size_t(j) * size_t(R) + size_t(s)]) + ", the reference " +
                              std::to_string(want));
          for (size_t i = 0; i < tokens.size(); ++i) {
            size_t const row = size_t(j) * size_t(rows_per_expert) + size_t(begin) + i;
            if (src_info[row] != tokens[i] ||
                !std::equal(recv_x.begin() + std::ptrdiff_t(row * size_t(H)),
                            recv_x.begin() + std::ptrdiff_t((row + 1) * size_t(H)),
                            ranks[size_t(s)].x.begin() + std::ptrdiff_t(size_t(tokens[i]) * size_t(H))))
              throw CheckFailed("low_latency_dispatch: rank " + std::to_string(r) + " expert " + std::to_string(j) +
                                " row " + std::to_string(row) + " is not token " + std::to_string(tokens[i]) +
                                " of rank " + std::to_string(s));
          }
          begin += int64_t(tokens.size());
        }
        if (count[size_t(j)] != begin)
          throw CheckFailed("low_latency_dispatch: rank " + std::to_string(r) + " expert " + std::to_string(j) +
                            " recv_count " + std::to_string(count[size_t(j)]) + ", the reference " +
                            std::to_string(begin));
      }
    }
    // Combine with identity experts: every expert sends its received rows back as they came
    combine_s += run_step(device, slots, "low_latency_combine_send", all, limit_s, [&](int r) {
      kernels::LowLatencyCombineSendArgs<Shm> args;
      args.comm = comm(r);
      args.slot = slot;
      args.x = ranks[size_t(r)].recv_x.get<void const>();
      args.layout_range = ranks[size_t(r)].layout_range.get<int64_t const>();
      device.launch(r, args);
    }).seconds;
    combine_s += run_step(device, slots, "low_latency_combine_recv", all, limit_s, [&](int r) {
      kernels::LowLatencyCombineRecvArgs<Shm> args;
      args.comm = comm(r);
      args.slot = slot;
      args.num_tokens = ranks[size_t(r)].num_tokens;
      args.topk_idx = ranks[size_t(r)].topk_device.get<int64_t const>();
      args.topk_weights = ranks[size_t(r)].weights_device.get<float const>();
      args.num_topk = K;
      args.slot_of = ranks[size_t(r)].slot_of.get<int32_t const>();
      args.out = ranks[size_t(r)].combined.get();
      device.launch(r, args);
    }).seconds;
    for (int r = 0; r < R; ++r) {
      LlRank const& mine = ranks[size_t(r)];
      std::vector<uint16_t> want(mine.x.size());
      for (int t = 0; t < mine.num_tokens; ++t)
        for (int h = 0; h < H; ++h) {
          float acc = 0.0f;
          for (int k = 0; k < K; ++k) {
            if (mine.topk[size_t(t) * size_t(K) + size_t(k)] < 0) continue;
            volatile float const product =  // rounded on its own, as the kernel's mul_rn (no contraction)
                mine.weights[size_t(t) * size_t(K) + size_t(k)] *
                test::ref_bf16_to_float(mine.x[size_t(t) * size_t(H) + size_t(h)]);
            acc = acc + product;
          }
          want[size_t(t) * size_t(H) + size_t(h)] = test::ref_float_to_bf16(acc);
        }
      expect_equal(device, "low_latency_combine out", r, mine.combined, want);
    }
  }
  return {Status::kPass, std::to_string(R) + " ranks, M=" + std::to_string(M) + ", hidden " + std::to_string(H) +
                             " bf16, top-" + std::to_string(K) + " of " + std::to_string(E) +
                             ": two rounds (both slots) match the reference (dispatch steps " +
                             std::to_string(int(dispatch_s * 1e3)) + " ms, combine steps " +
                             std::to_string(int(combine_s * 1e3)) + " ms)"};
}

}  // namespace

std::vector<Check> low_latency_checks(Scale const& scale) {
  return {{"low_latency_" + std::to_string(scale.ll_ranks) + "_ranks_peer_memory_bf16",
           [scale](Device& device) { return low_latency_rounds(device, scale); }}};
}

}  // namespace epcomm::gpu_check
