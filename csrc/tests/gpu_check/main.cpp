// gpu_check: the one-process part of `make gpu-check` (README, "First run on a GPU").
//
//   gpu_check [--dry-run] [--list] [name-substring...]   run the checks (all, or those whose names match)
//   gpu_check --count-gpus                               print the number of usable GPUs (0 without one)
//
// One line per check, "[PASS] name: detail (time)", "[FAIL] ..." or "[SKIP] ...", then a verdict line.
// Exit status: 0 every check passed (skips allowed), 1 a check failed, 2 the harness could not run
// (bad arguments, the device could not be set up), 3 no usable GPU: nothing was checked.
// The CUDA build checks at full size; --dry-run shrinks the sizes (a smoke run). The SIMT build runs the
// same checks on the CPU and only with --dry-run (CI runs it: make -C csrc gpu-check-dry-run).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "checks.hpp"
#include "device.hpp"
#include "fake_cluster.hpp"

namespace epcomm::gpu_check {

Scale gpu_scale() { return Scale{}; }

// Small enough for 2 shared CPU cores in well under a minute; the same scenarios and verdicts.
Scale dry_run_scale() {
  Scale scale;
  scale.dry_run = true;
  scale.hidden = 256;  // FP8 needs a multiple of 128
  scale.num_experts = 64;
  scale.token_counts = {0, 1, 33, 256};  // 256: each 8-slot ring wraps several times
  scale.intranode_config = {10, 2, 8};
  scale.kernel_timeout_s = 60;
  scale.oversubscribed_hidden = 128;
  scale.oversubscribed_tokens_per_channel = 4;
  scale.missing_rank_timeout_s = 0.3;
  scale.stall_tokens = 32;
  scale.internode_tokens = 40;
  scale.internode_config = {{2, 2, 6}, 2, 4};
  scale.ll_ranks = 4;
  scale.ll_max_tokens = 12;
  return scale;
}

namespace {

constexpr int kExitFailed = 1, kExitHarnessError = 2, kExitNoGpu = 3;

std::vector<Check> all_checks(Scale const& scale) {
  std::vector<Check> checks;
  for (auto family : {intranode_checks, missing_rank_checks, long_kernel_checks, internode_checks, low_latency_checks})
    for (Check& check : family(scale)) checks.push_back(std::move(check));
  return checks;
}

char const* status_tag(Status status) {
  switch (status) {
    case Status::kPass: return "[PASS]";
    case Status::kFail: return "[FAIL]";
    case Status::kSkip: return "[SKIP]";
  }
  return "[????]";
}

int run(int argc, char** argv) {
  bool dry_run = false, list = false;
  std::vector<std::string> selected;
  for (int i = 1; i < argc; ++i) {
    std::string const argument = argv[i];
    if (argument == "--dry-run") {
      dry_run = true;
    } else if (argument == "--list") {
      list = true;
    } else if (argument == "--count-gpus") {
      std::printf("%d\n", count_gpus());
      return 0;
    } else if (argument.rfind("--", 0) == 0) {
      std::fprintf(stderr, "gpu_check: unknown option %s (see the comment at the top of main.cpp)\n", argument.c_str());
      return kExitHarnessError;
    } else {
      selected.push_back(argument);
    }
  }
  std::vector<Check> checks = all_checks(dry_run ? dry_run_scale() : gpu_scale());
  std::erase_if(checks, [&](Check const& check) {
    if (selected.empty()) return false;
    for (std::string const& part : selected)
      if (check.name.find(part) != std::string::npos) return false;
    return true;
  });
  if (list) {
    for (Check const& check : checks) std::printf("%s\n", check.name.c_str());
    return 0;
  }
  if (checks.empty()) {
    std::fprintf(stderr, "gpu_check: no check matches the names given\n");
    return kExitHarnessError;
  }

  std::unique_ptr<Device> device;
  try {
    device = make_device();
  } catch (NoGpu const& no_gpu) {
    std::printf("gpu-check: no usable GPU on this machine (%s): nothing was checked\n", no_gpu.reason.c_str());
    return kExitNoGpu;
  } catch (std::exception const& error) {
    std::printf("gpu-check: the device could not be set up: %s\n", error.what());
    return kExitHarnessError;
  }
  if (!device->is_gpu() && !dry_run) {
    std::printf("gpu-check: this build runs the kernels on the CPU (SIMT target) and only with --dry-run\n");
    return kExitHarnessError;
  }
  std::printf("gpu-check on %s%s: %zu checks\n", device->description().c_str(),
              dry_run ? ", dry run (small sizes)" : "", checks.size());
  std::fflush(stdout);

  using Clock = std::chrono::steady_clock;
  Clock::time_point const start = Clock::now();
  int passed = 0, failed = 0, skipped = 0;
  for (Check const& check : checks) {
    Verdict verdict;
    Clock::time_point const check_start = Clock::now();
    if (std::string const reason = device->unusable_reason(); !reason.empty()) {
      verdict = {Status::kFail, "not run: the device is unusable after " + reason};
    } else {
      try {
        verdict = check.run(*device);
      } catch (std::exception const& error) {
        verdict = {Status::kFail, error.what()};
      }
    }
    double const seconds = std::chrono::duration<double>(Clock::now() - check_start).count();
    (verdict.status == Status::kPass ? passed : verdict.status == Status::kFail ? failed : skipped) += 1;
    std::printf("%s %s: %s (%.1f s)\n", status_tag(verdict.status), check.name.c_str(), verdict.detail.c_str(),
                seconds);
    std::fflush(stdout);
  }
  double const seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("gpu-check: %s: %d passed, %d failed, %d skipped in %.1f s\n", failed == 0 ? "PASS" : "FAIL", passed,
              failed, skipped, seconds);
  return failed == 0 ? 0 : kExitFailed;
}

}  // namespace

}  // namespace epcomm::gpu_check

int main(int argc, char** argv) { return epcomm::gpu_check::run(argc, argv); }
