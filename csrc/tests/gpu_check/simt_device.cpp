// The gpu-check Device (device.hpp) on the SIMT target: the dry run of `make gpu-check`. The same
// scenarios run the same kernels through the CPU launchers (kernels/*_launch_simt.cpp): a step is one
// simt::ConcurrentLaunch holding every fake rank's grid (every block on its own OS thread), "device"
// memory is zeroed host memory. What only a GPU has (an SM count, an occupancy limit, a stream that runs
// next to another) is reported as absent, and the scenarios say what they skipped.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "../../kernels/internode.hpp"
#include "../../kernels/intranode.hpp"
#include "device.hpp"

namespace epcomm::gpu_check {

namespace {

class SimtDevice final : public Device {
 public:
  std::string description() const override {
    return "SIMT target on " + std::to_string(std::thread::hardware_concurrency()) + " CPU threads (dry run)";
  }
  bool is_gpu() const override { return false; }
  int num_sms() const override { return 0; }
  double clock_ticks_per_second() const override { return 1e9; }  // clock64() counts nanoseconds here

  void* allocate(size_t bytes) override {
    size_t const rounded = std::max<size_t>(128, (bytes + 127) / 128 * 128);
    void* pointer = std::aligned_alloc(128, rounded);
    if (pointer == nullptr) throw std::bad_alloc();
    std::memset(pointer, 0, rounded);
    return pointer;
  }
  void release(void* pointer) override { std::free(pointer); }
  void copy_to_device(void* destination, void const* source, size_t bytes) override {
    if (bytes > 0) std::memcpy(destination, source, bytes);
  }
  void copy_to_host(void* destination, void const* source, size_t bytes) override {
    if (bytes > 0) std::memcpy(destination, source, bytes);
  }
  MappedMemory allocate_mapped(size_t bytes) override {
    void* pointer = allocate(bytes);
    return {pointer, pointer};
  }
  void release_mapped(MappedMemory memory) override { release(memory.host); }

  void begin_step(char const* name, int /*num_ranks*/, double host_limit_s) override {
    simt::LaunchOptions options;
    options.name = name;
    step_name_ = name;
    // The watchdog stands in for the CUDA target's host deadline
    options.timeout = std::chrono::milliseconds(int64_t(host_limit_s * 1000));
    step_.emplace(std::move(options));
    problems_.clear();
    start_ = std::chrono::steady_clock::now();
  }

  // get_dispatch_layout has no peers to wait for: it runs at once, on this thread
  void launch(int rank, kernels::LayoutArgs const& args) override {
    simt::LaunchStatus const status = kernels::launch_get_dispatch_layout(args);
    if (!status.ok()) problems_ += "rank " + std::to_string(rank) + ": get_dispatch_layout: " + status.message + "\n";
  }
  void launch(int rank, kernels::NotifyArgs const& args) override { add(rank, kernels::add_notify, args); }
  void launch(int rank, kernels::IntranodeDispatchArgs const& args) override {
    add(rank, kernels::add_intranode_dispatch, args);
  }
  void launch(int rank, kernels::IntranodeCombineArgs const& args) override {
    add(rank, kernels::add_intranode_combine, args);
  }
  void launch(int rank, kernels::InternodeNotifyArgs<Shm> const& args) override {
    add(rank, kernels::add_internode_notify, args);
  }
  void launch(int rank, kernels::InternodeDispatchArgs<Shm> const& args) override {
    add(rank, kernels::add_internode_dispatch, args);
  }
  void launch(int rank, kernels::InternodeCombineArgs<Shm> const& args) override {
    add(rank, kernels::add_internode_combine, args);
  }
  void launch(int rank, kernels::LowLatencyDispatchSendArgs<Shm> const& args) override {
    add(rank, kernels::add_low_latency_dispatch_send, args);
  }
  void launch(int rank, kernels::LowLatencyDispatchRecvArgs<Shm> const& args) override {
    add(rank, kernels::add_low_latency_dispatch_recv, args);
  }
  void launch(int rank, kernels::LowLatencyCombineSendArgs<Shm> const& args) override {
    add(rank, kernels::add_low_latency_combine_send, args);
  }
  void launch(int rank, kernels::LowLatencyCombineRecvArgs<Shm> const& args) override {
    add(rank, kernels::add_low_latency_combine_recv, args);
  }

  StepOutcome finish_step() override {
    StepOutcome outcome;
    simt::LaunchStatus const status = step_->try_run();
    if (!status.ok()) {
      problems_ += std::string(simt::error_kind_name(status.kind)) + ": " + status.message + "\n";
      if (status.kind == simt::ErrorKind::Timeout) {  // as the CUDA target's host deadline: stop checking
        outcome.finished = false;
        unusable_reason_ = "step '" + step_name_ + "' hit the SIMT watchdog";
      }
    }
    step_.reset();
    outcome.launch_problems = problems_;
    outcome.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    return outcome;
  }

  int blocks_per_sm(Family, int) override { return 0; }
  std::string unusable_reason() const override { return unusable_reason_; }

  bool start_long_kernel(double) override { return false; }
  bool long_kernel_running() override { return false; }
  void stop_long_kernel() override {}

  std::unique_ptr<runtime::DeviceRuntime> make_runtime(runtime::RuntimeOptions const& options) override {
    return runtime::make_cpu_runtime(options);
  }

 private:
  template <class Args>
  void add(int rank, void (*add_grid)(simt::ConcurrentLaunch&, Args const&), Args const& args) {
    try {
      add_grid(*step_, args);
    } catch (std::exception const& error) {  // an argument the launcher refuses (its validator's message)
      problems_ += "rank " + std::to_string(rank) + ": " + error.what() + "\n";
    }
  }

  std::optional<simt::ConcurrentLaunch> step_;
  std::string step_name_, problems_, unusable_reason_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace

int count_gpus() { return 0; }

std::unique_ptr<Device> make_device() { return std::make_unique<SimtDevice>(); }

}  // namespace epcomm::gpu_check
