// A call must not wait for unrelated work: one dispatch + combine through the device runtime (the path the
// cuda backend takes: runtime/cuda_entries.cu, its pooled ErrorSlots and its stream-only wait), timed while
// a kernel holds an SM on another stream. A cudaFreeHost (or any device-wide synchronize) inside a call
// would make the call wait until that kernel ends; the kernel is held until the call has returned, so a
// call that waited for it cannot pass (the kernel's own limit ends it, and the call returns after it).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "../../kernels/intranode.hpp"
#include "checks.hpp"
#include "fake_cluster.hpp"
#include "problem.hpp"

namespace epcomm::gpu_check {

namespace {

// One rank of the device runtime with its buffer, and the device arrays of one dispatch + combine.
class OneRankCall {
 public:
  OneRankCall(Device& device, Scale const& scale)
      : device_(device), runtime_(device.make_runtime({0, 1, run_token(), -1})) {
    problem_.num_ranks = problem_.num_nvl_ranks = 1;
    problem_.num_tokens = scale.stall_tokens;
    problem_.hidden = scale.hidden;
    problem_.num_topk = scale.num_topk;
    problem_.num_experts = 32;
    problem_.seed = 3;
    spec_.config = {2, 6, 64};
    spec_.workspace = {1, problem_.num_local_experts(), problem_.num_topk, 2 * problem_.hidden};
    runtime_->allocate(kernels::NvlWorkspace(spec_.workspace, spec_.config).required_bytes());
    runtime_->open_peers({runtime_->export_handle()});
    runtime_->release_names();
    stream_ = runtime_->create_stream();

    tokens_ = make_tokens(problem_);
    expected_ = expected_receives(problem_, tokens_, 1);
    expert_out_ = make_expert_outputs(problem_, expected_);
    want_ = expected_combines(problem_, expected_, expert_out_, false)[0];
    int const N = problem_.num_tokens, K = problem_.num_topk;
    size_t const M = expected_[0].recv_src_idx.size(), H = size_t(problem_.hidden);
    std::vector<uint8_t> in_rank(static_cast<size_t>(N));
    std::vector<int32_t> per_expert(size_t(problem_.num_experts), 0);
    for (int t = 0; t < N; ++t) {
      in_rank[size_t(t)] = test::token_goes_to(problem_.dispatch_shape(), tokens_[0], t, 0);
      for (int k = 0; k < K; ++k)
        if (int64_t const e = tokens_[0].topk_idx[size_t(t) * size_t(K) + size_t(k)]; e >= 0)
          ++per_expert[size_t(e)];
    }
    x_ = upload(device, tokens_[0].x);
    topk_idx_ = upload(device, tokens_[0].topk_idx);
    topk_weights_ = upload(device, tokens_[0].topk_weights);
    in_rank_ = upload(device, in_rank);
    per_expert_ = upload(device, per_expert);
    rank_prefix_ = DeviceBuffer(device, sizeof(int32_t) * 2);
    channel_prefix_ = DeviceBuffer(device, sizeof(int32_t) * size_t(spec_.config.num_channels + 1));
    recv_per_expert_ = DeviceBuffer(device, sizeof(int32_t) * size_t(problem_.num_experts));
    recv_x_ = DeviceBuffer(device, M * H * 2);
    recv_topk_idx_ = DeviceBuffer(device, M * size_t(K) * sizeof(int64_t));
    recv_topk_weights_ = DeviceBuffer(device, M * size_t(K) * sizeof(float));
    recv_src_idx_ = DeviceBuffer(device, M * sizeof(int32_t));
    expert_out_device_ = upload(device, expert_out_[0]);
    combined_x_ = DeviceBuffer(device, size_t(N) * H * 2);
    combined_weights_ = DeviceBuffer(device, size_t(N) * size_t(K) * sizeof(float));
  }

  // notify (counts) -> dispatch -> notify (barrier) -> combine, each a runtime call on one stream. `enqueue`: the
  // data kernels (dispatch, combine) only issued, as the cuda backend issues them, then check_pending waits for
  // them and reads their ErrorSlots; otherwise every call is waited for.
  void run(double timeout_s, bool enqueue = false) {
    int const N = problem_.num_tokens, K = problem_.num_topk;
    kernels::NotifyParams notify;
    notify.exchange_counts = true;
    notify.is_token_in_rank = in_rank_.get<bool const>();
    notify.num_tokens_per_expert = per_expert_.get<int32_t const>();
    notify.num_tokens = N;
    notify.recv_rank_prefix = rank_prefix_.get<int32_t>();
    notify.recv_channel_prefix_matrix = channel_prefix_.get<int32_t>();
    notify.num_recv_tokens_per_expert = recv_per_expert_.get<int32_t>();
    runtime_->run(*stream_, spec_, notify, timeout_s);

    kernels::IntranodeDispatchParams dispatch;
    dispatch.x = x_.get<void const>();
    dispatch.hidden_bytes = problem_.hidden_bytes();
    dispatch.topk_idx = topk_idx_.get<int64_t const>();
    dispatch.topk_weights = topk_weights_.get<float const>();
    dispatch.num_topk = K;
    dispatch.num_experts = problem_.num_experts;
    dispatch.num_tokens = N;
    dispatch.is_token_in_rank = in_rank_.get<bool const>();
    dispatch.recv_channel_prefix_matrix = channel_prefix_.get<int32_t const>();
    dispatch.recv_x = recv_x_.get();
    dispatch.recv_topk_idx = recv_topk_idx_.get<int64_t>();
    dispatch.recv_topk_weights = recv_topk_weights_.get<float>();
    dispatch.recv_src_idx = recv_src_idx_.get<int32_t>();
    runtime_->run(*stream_, spec_, dispatch, timeout_s, enqueue);

    kernels::NotifyParams barrier;
    runtime_->run(*stream_, spec_, barrier, timeout_s);

    kernels::IntranodeCombineParams combine;
    combine.x = expert_out_device_.get<void const>();
    combine.topk_weights = recv_topk_weights_.get<float const>();
    combine.hidden = problem_.hidden;
    combine.num_topk = K;
    combine.num_tokens = N;
    combine.is_token_in_rank = in_rank_.get<bool const>();
    combine.recv_channel_prefix_matrix = channel_prefix_.get<int32_t const>();
    combine.combined_x = combined_x_.get();
    combine.combined_topk_weights = combined_weights_.get<float>();
    runtime_->run(*stream_, spec_, combine, timeout_s, enqueue);
    if (enqueue) {
      if (runtime_->num_pending() == 0) throw CheckFailed("an enqueued combine left nothing pending to report");
      runtime_->check_pending(true);
    }
  }

  // The outputs of the last run against the reference (throws CheckFailed naming the first difference).
  void check(std::string const& which) {
    expect_equal(device_, (which + " dispatch recv_x").c_str(), 0, recv_x_, expected_[0].recv_x);
    expect_equal(device_, (which + " combined_x").c_str(), 0, combined_x_, want_.combined_x);
    expect_equal(device_, (which + " combined_topk_weights").c_str(), 0, combined_weights_, want_.combined_weights);
  }

  std::string describe() const { return problem_.describe(); }

 private:
  // Names the cpu runtime's shared-memory segment (hex digits): unique per process and moment
  static std::string run_token() {
    char token[33];
    std::snprintf(token, sizeof(token), "9c%08x%012llx", unsigned(getpid()),
                  (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count() & 0xffffffffffffULL);
    return token;
  }

  Device& device_;
  std::unique_ptr<runtime::DeviceRuntime> runtime_;
  std::unique_ptr<runtime::Stream> stream_;
  Problem problem_;
  kernels::IntranodeSpec spec_;
  std::vector<test::RankTokens> tokens_;
  std::vector<test::ExpectedReceive> expected_;
  std::vector<std::vector<uint16_t>> expert_out_;
  ExpectedCombine want_;
  DeviceBuffer x_, topk_idx_, topk_weights_, in_rank_, per_expert_, rank_prefix_, channel_prefix_, recv_per_expert_,
      recv_x_, recv_topk_idx_, recv_topk_weights_, recv_src_idx_, expert_out_device_, combined_x_, combined_weights_;
};

std::string milliseconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f ms", seconds * 1e3);
  return text;
}

Verdict call_next_to_long_kernel(Device& device, Scale const& scale, bool enqueue) {
  OneRankCall call(device, scale);
  // The first call takes the runtime's one-time allocations (the ErrorSlot pool's first slot)
  call.run(scale.kernel_timeout_s, enqueue);
  call.check("first call:");

  using Clock = std::chrono::steady_clock;
  bool const long_kernel = device.start_long_kernel(scale.long_kernel_max_s);
  Clock::time_point const start = Clock::now();
  call.run(scale.kernel_timeout_s, enqueue);
  double const seconds = std::chrono::duration<double>(Clock::now() - start).count();
  bool const still_running = long_kernel && device.long_kernel_running();
  if (long_kernel) device.stop_long_kernel();
  call.check("timed call:");
  std::string const what = std::string(enqueue ? "an enqueued " : "a ") + "dispatch + combine (4 runtime calls" +
                           (enqueue ? " and check_pending, " : ", ") + call.describe() + ") took " + milliseconds(seconds);
  if (!long_kernel)
    return {Status::kSkip, "the SIMT target runs no kernel next to a call (its streams run work at once); " + what +
                               " through the cpu runtime and matched the reference"};
  if (!still_running)
    throw CheckFailed(what + " and returned only after the long kernel on another stream had ended (limit " +
                      milliseconds(scale.long_kernel_max_s) + "): a call waits for unrelated work");
  return {Status::kPass, what + " while a kernel held an SM on another stream, and matched the reference"};
}

}  // namespace

std::vector<Check> long_kernel_checks(Scale const& scale) {
  return {{"call_does_not_wait_for_a_long_kernel_on_another_stream",
           [scale](Device& device) { return call_next_to_long_kernel(device, scale, false); }},
          {"enqueued_call_reports_at_check_pending_next_to_a_long_kernel",
           [scale](Device& device) { return call_next_to_long_kernel(device, scale, true); }}};
}

}  // namespace epcomm::gpu_check
