// The gpu-check Device (device.hpp) on one GPU: R fake ranks share it. Buffers are plain cudaMalloc
// allocations that every fake rank addresses directly (same device: no IPC, no peer access to enable);
// each fake rank launches on its own non-blocking stream through the library's own launchers
// (kernels/intranode_launch.cu, internode_launch.cu), so the co-residency check runs as in production.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../../common/compat.cuh"
#include "../../common/ptx.cuh"
#include "../../kernels/co_residency_check.hpp"
#include "../../kernels/internode_validate.hpp"
#include "../../kernels/intranode_validate.hpp"
#include "../../kernels/low_latency_validate.hpp"
#include "device.hpp"

namespace epcomm::gpu_check {

namespace {

using Clock = std::chrono::steady_clock;

std::string cuda_error_text(cudaError_t error) {
  return std::string(cudaGetErrorName(error)) + " (" + cudaGetErrorString(error) + ")";
}

// A failed CUDA call outside a step: the harness cannot go on (the check that made it fails).
void check_cuda(cudaError_t error, char const* what) {
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cuda_error_text(error));
}

// Holds one SM on its own stream until the host sets *release or max_cycles pass; *started tells the host
// it is running. Both flags are mapped host memory (polled over PCIe, like the kernels' ErrorSlots).
__global__ void hold_one_sm_kernel(int32_t* started, int32_t const* release, long long max_cycles) {
  if (threadIdx.x != 0) return;
  ptx::st_release_sys_global(started, int32_t(1));
  long long const start = ptx::read_clock64();
  while (ptx::ld_acquire_sys_global(release) == 0 && ptx::read_clock64() - start < max_cycles) ptx::nanosleep_ns(1000);
}

class CudaDevice final : public Device {
 public:
  CudaDevice() {
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    check_cuda(cudaGetDeviceProperties(&properties_, device_), "cudaGetDeviceProperties");
    int clock_khz = 0;
    check_cuda(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_), "cudaDeviceGetAttribute(clock rate)");
    ticks_per_second_ = double(clock_khz) * 1e3;
    long_flags_ = allocate_mapped(2 * sizeof(int32_t));
    check_cuda(cudaStreamCreateWithFlags(&long_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  }
  ~CudaDevice() override {
    if (!unusable_reason_.empty()) return;  // a grid may still run: leave everything to the process's exit
    for (cudaStream_t stream : streams_) cudaStreamDestroy(stream);
    cudaStreamDestroy(long_stream_);
    release_mapped(long_flags_);
  }

  // What the checks' verdicts depend on: the SM count, the clock the kernels' timeouts are converted with,
  // and whether the kernels' atomics on the mapped ErrorSlot are native (PCIe atomics to host memory).
  std::string description() const override {
    int host_atomics = 0;
    cudaDeviceGetAttribute(&host_atomics, cudaDevAttrHostNativeAtomicSupported, device_);
    return std::string(properties_.name) + " (" + std::to_string(properties_.multiProcessorCount) + " SMs, sm_" +
           std::to_string(properties_.major) + std::to_string(properties_.minor) + ", clock64 at " +
           std::to_string(int(ticks_per_second_ / 1e6)) + " MHz, host-native atomics: " +
           (host_atomics ? "yes" : "no") + ")";
  }
  bool is_gpu() const override { return true; }
  int num_sms() const override { return properties_.multiProcessorCount; }
  double clock_ticks_per_second() const override { return ticks_per_second_; }

  void* allocate(size_t bytes) override {
    void* pointer = nullptr;
    // Never a null pointer for an empty array: the kernels' validators read null as "not given"
    check_cuda(cudaMalloc(&pointer, bytes > 0 ? bytes : 16), "cudaMalloc");
    check_cuda(cudaMemset(pointer, 0, bytes > 0 ? bytes : 16), "cudaMemset");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemset");
    return pointer;
  }
  void release(void* pointer) override { cudaFree(pointer); }

  // A pageable host-to-device cudaMemcpy may return before its DMA lands, and the fake ranks' non-blocking
  // streams are not ordered after the legacy stream: wait for the device before any kernel can read it.
  void copy_to_device(void* destination, void const* source, size_t bytes) override {
    if (bytes == 0) return;
    check_cuda(cudaMemcpy(destination, source, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize after cudaMemcpy");
  }
  void copy_to_host(void* destination, void const* source, size_t bytes) override {
    if (bytes == 0) return;
    check_cuda(cudaMemcpy(destination, source, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
  }
  MappedMemory allocate_mapped(size_t bytes) override {
    MappedMemory memory;
    check_cuda(cudaHostAlloc(&memory.host, bytes, cudaHostAllocMapped), "cudaHostAlloc(mapped)");
    std::memset(memory.host, 0, bytes);
    check_cuda(cudaHostGetDevicePointer(&memory.device, memory.host, 0), "cudaHostGetDevicePointer");
    return memory;
  }
  void release_mapped(MappedMemory memory) override {
    if (memory.host != nullptr) cudaFreeHost(memory.host);
  }

  void begin_step(char const* name, int num_ranks, double host_limit_s) override {
    step_name_ = name;
    step_problems_.clear();
    step_limit_s_ = host_limit_s;
    while (int(streams_.size()) < num_ranks) {
      cudaStream_t stream = nullptr;
      check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      streams_.push_back(stream);
    }
    step_streams_ = num_ranks;
    step_start_ = Clock::now();
  }

  void launch(int rank, kernels::LayoutArgs const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_get_dispatch_layout(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::NotifyArgs const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_notify(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::IntranodeDispatchArgs const& args) override {
    kernels::CoResidency refused;
    if (valid(rank, args))
      note(rank, args, kernels::cuda_launch_intranode_dispatch(args, stream(rank), &refused), &refused);
  }
  void launch(int rank, kernels::IntranodeCombineArgs const& args) override {
    kernels::CoResidency refused;
    if (valid(rank, args))
      note(rank, args, kernels::cuda_launch_intranode_combine(args, stream(rank), &refused), &refused);
  }
  void launch(int rank, kernels::InternodeNotifyArgs<Shm> const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_internode_notify(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::InternodeDispatchArgs<Shm> const& args) override {
    kernels::CoResidency refused;
    if (valid(rank, args))
      note(rank, args, kernels::cuda_launch_internode_dispatch(args, stream(rank), &refused), &refused);
  }
  void launch(int rank, kernels::InternodeCombineArgs<Shm> const& args) override {
    kernels::CoResidency refused;
    if (valid(rank, args))
      note(rank, args, kernels::cuda_launch_internode_combine(args, stream(rank), &refused), &refused);
  }
  // LL grids wait on peers' signals only, never on each other's blocks: no co-residency to refuse
  void launch(int rank, kernels::LowLatencyDispatchSendArgs<Shm> const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_low_latency_dispatch_send(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::LowLatencyDispatchRecvArgs<Shm> const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_low_latency_dispatch_recv(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::LowLatencyCombineSendArgs<Shm> const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_low_latency_combine_send(args, stream(rank)), nullptr);
  }
  void launch(int rank, kernels::LowLatencyCombineRecvArgs<Shm> const& args) override {
    if (valid(rank, args)) note(rank, args, kernels::cuda_launch_low_latency_combine_recv(args, stream(rank)), nullptr);
  }

  // Polls every stream of the step (never a device-wide synchronize: the long kernel may be running).
  StepOutcome finish_step() override {
    StepOutcome outcome;
    Clock::time_point const deadline =
        step_start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(step_limit_s_));
    std::vector<bool> done(size_t(step_streams_), false);
    for (int pending = step_streams_; pending > 0;) {
      pending = 0;
      for (int rank = 0; rank < step_streams_; ++rank) {
        if (done[size_t(rank)]) continue;
        cudaError_t const state = cudaStreamQuery(streams_[size_t(rank)]);
        if (state == cudaErrorNotReady) {
          ++pending;
          continue;
        }
        done[size_t(rank)] = true;
        if (state != cudaSuccess) {
          step_problems_ += "rank " + std::to_string(rank) + ": " + cuda_error_text(state) + "\n";
          unusable_reason_ = std::string("a CUDA error in step '") + step_name_ + "': " + cuda_error_text(state);
        }
      }
      if (pending == 0) break;
      if (Clock::now() >= deadline) {
        outcome.finished = false;
        unusable_reason_ = std::string("step '") + step_name_ + "' still ran " + std::to_string(step_limit_s_) +
                           " s after its launch (its grids may still be running)";
        break;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    outcome.seconds = std::chrono::duration<double>(Clock::now() - step_start_).count();
    outcome.launch_problems = step_problems_;
    return outcome;
  }

  int blocks_per_sm(Family family, int threads_per_block) override {
    int blocks = 0;
    int const error = family == Family::kIntranode ? kernels::cuda_intranode_blocks_per_sm(threads_per_block, &blocks)
                                                   : kernels::cuda_internode_blocks_per_sm(threads_per_block, &blocks);
    check_cuda(cudaError_t(error), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return blocks;
  }

  std::string unusable_reason() const override { return unusable_reason_; }

  bool start_long_kernel(double max_seconds) override {
    int32_t* flags = static_cast<int32_t*>(long_flags_.host);
    std::atomic_ref<int32_t>(flags[0]).store(0);
    std::atomic_ref<int32_t>(flags[1]).store(0);
    int32_t* device_flags = static_cast<int32_t*>(long_flags_.device);
    hold_one_sm_kernel<<<1, 32, 0, long_stream_>>>(device_flags, device_flags + 1,
                                                   (long long)(max_seconds * ticks_per_second_));
    check_cuda(cudaGetLastError(), "hold_one_sm_kernel launch");
    // Running, not merely queued: the timed call must start while it holds its SM
    Clock::time_point const give_up = Clock::now() + std::chrono::seconds(10);
    while (std::atomic_ref<int32_t>(flags[0]).load() == 0) {
      if (Clock::now() > give_up) throw std::runtime_error("the long kernel did not start within 10 s");
      std::this_thread::yield();
    }
    return true;
  }
  bool long_kernel_running() override { return cudaStreamQuery(long_stream_) == cudaErrorNotReady; }
  void stop_long_kernel() override {
    std::atomic_ref<int32_t>(static_cast<int32_t*>(long_flags_.host)[1]).store(1);
    check_cuda(cudaStreamSynchronize(long_stream_), "cudaStreamSynchronize(long kernel)");
  }

  std::unique_ptr<runtime::DeviceRuntime> make_runtime(runtime::RuntimeOptions const& options) override {
    runtime::RuntimeOptions on_this_gpu = options;
    on_this_gpu.device = device_;
    return runtime::make_cuda_runtime(on_this_gpu);
  }

 private:
  void* stream(int rank) const { return streams_.at(size_t(rank)); }

  template <class Args>
  static char const* kernel_name() {
    if constexpr (requires { Args::kName; }) return Args::kName;
    return "get_dispatch_layout";
  }

  // The launchers refuse invalid arguments with a bare cudaErrorInvalidValue: the validator first, for its message
  template <class Args>
  bool valid(int rank, Args const& args) {
    char const* problem = kernels::validate(args);
    if (problem != nullptr) step_problems_ += "rank " + std::to_string(rank) + ": " + problem + "\n";
    return problem == nullptr;
  }

  template <class Args>
  void note(int rank, Args const&, int error, kernels::CoResidency const* refused) {
    if (error == int(cudaSuccess)) return;
    std::string problem = "rank " + std::to_string(rank) + ": " + kernel_name<Args>() + ": ";
    if (error == kernels::kCoResidencyRefused && refused != nullptr)
      problem += "refused by the co-residency check: " + kernels::describe_co_residency(*refused);
    else
      problem += "launch failed with " + cuda_error_text(cudaError_t(error));
    step_problems_ += problem + "\n";
  }

  int device_ = 0;
  cudaDeviceProp properties_{};
  double ticks_per_second_ = 1e9;
  std::vector<cudaStream_t> streams_;  // [fake rank]
  cudaStream_t long_stream_ = nullptr;
  MappedMemory long_flags_;  // [0] started, [1] release
  std::string step_name_, step_problems_, unusable_reason_;
  double step_limit_s_ = 0;
  int step_streams_ = 0;
  Clock::time_point step_start_;
};

}  // namespace

int count_gpus() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
}

std::unique_ptr<Device> make_device() {
  int count = 0;
  cudaError_t const error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) throw NoGpu{"cudaGetDeviceCount failed with " + cuda_error_text(error)};
  if (count == 0) throw NoGpu{"cudaGetDeviceCount found no device"};
  return std::make_unique<CudaDevice>();
}

}  // namespace epcomm::gpu_check
