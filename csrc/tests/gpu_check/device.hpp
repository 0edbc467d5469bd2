#pragma once
// One device shared by R fake ranks: the only thing the gpu-check scenarios know about the target.
//
//   cuda (cuda_device.cu, nvcc):  one GPU; memory from cudaMalloc (a fake rank reaches another's buffer
//                                 through a plain device pointer: same device, no IPC), ErrorSlots in
//                                 mapped pinned host memory, one non-blocking stream per fake rank.
//   simt (simt_device.cpp, g++):  the kernels through the SIMT layer; "device" memory is host memory,
//                                 a step is one simt::ConcurrentLaunch holding every rank's grid.
//
// A step is what one collective call looks like from one GPU: every fake rank's grid is launched on
// its own stream before any is waited for (a grid waiting for a peer's grid that was never launched
// would hang), then all are waited for together against a host deadline.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "../../kernels/internode.hpp"
#include "../../kernels/intranode.hpp"
#include "../../kernels/low_latency.hpp"
#include "../../runtime/device_runtime.hpp"
#include "../../transport/shm_transport.cuh"

namespace epcomm::gpu_check {

using Shm = transport::ShmTransport;

// How a step ended, apart from what the kernels wrote into their ErrorSlots.
struct StepOutcome {
  bool finished = true;         // every grid returned before the host deadline
  std::string launch_problems;  // empty when every launch was accepted (else one line per refused launch)
  double seconds = 0;           // from the first launch to the end of the wait

  bool ok() const { return finished && launch_problems.empty(); }
};

// Host memory a kernel writes through its own pointer (cuda: cudaHostAllocMapped; simt: the same pointer).
struct MappedMemory {
  void* host = nullptr;
  void* device = nullptr;
};

class Device {
 public:
  virtual ~Device() = default;

  virtual std::string description() const = 0;  // e.g. "NVIDIA H200 (132 SMs, sm_90)"
  virtual bool is_gpu() const = 0;
  virtual int num_sms() const = 0;                     // 0 on the SIMT target
  virtual double clock_ticks_per_second() const = 0;   // clock64() ticks per second in kernels

  // Device memory every fake rank can address, zeroed. Freed with release().
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* pointer) = 0;
  virtual void copy_to_device(void* destination, void const* source, size_t bytes) = 0;
  virtual void copy_to_host(void* destination, void const* source, size_t bytes) = 0;
  virtual MappedMemory allocate_mapped(size_t bytes) = 0;  // zeroed
  virtual void release_mapped(MappedMemory memory) = 0;

  // A step of `num_ranks` fake ranks (see above). Each launch goes on stream `rank`.
  virtual void begin_step(char const* name, int num_ranks, double host_limit_s) = 0;
  virtual void launch(int rank, kernels::LayoutArgs const& args) = 0;
  virtual void launch(int rank, kernels::NotifyArgs const& args) = 0;
  virtual void launch(int rank, kernels::IntranodeDispatchArgs const& args) = 0;
  virtual void launch(int rank, kernels::IntranodeCombineArgs const& args) = 0;
  virtual void launch(int rank, kernels::InternodeNotifyArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::InternodeDispatchArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::InternodeCombineArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::LowLatencyDispatchSendArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::LowLatencyDispatchRecvArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::LowLatencyCombineSendArgs<Shm> const& args) = 0;
  virtual void launch(int rank, kernels::LowLatencyCombineRecvArgs<Shm> const& args) = 0;
  virtual StepOutcome finish_step() = 0;

  // Blocks of a family's dispatch and combine kernels (the smaller count) that fit on one SM at
  // `threads_per_block`, as the occupancy API says for an idle device; 0 where there is no such limit (simt).
  // The scenarios size their grids with it: every fake rank's grid must be resident at once, because a
  // resident grid that waits for a peer's grid queued behind it on the same GPU would wait forever.
  enum class Family { kIntranode, kInternode };
  virtual int blocks_per_sm(Family family, int threads_per_block) = 0;

  // Empty while the device can run more checks; else why not (a grid outlived its host deadline, or a
  // sticky CUDA error): the remaining checks are skipped with this reason.
  virtual std::string unusable_reason() const = 0;

  // A kernel that keeps one SM busy on a stream of its own until stop_long_kernel() or `max_seconds`.
  // false: this target cannot run a kernel next to a call (simt: a CPU stream runs its work at once).
  virtual bool start_long_kernel(double max_seconds) = 0;
  virtual bool long_kernel_running() = 0;
  virtual void stop_long_kernel() = 0;  // releases it and waits for its end

  // The device runtime of this target (runtime/device_runtime.hpp): what the Python backends use.
  virtual std::unique_ptr<runtime::DeviceRuntime> make_runtime(runtime::RuntimeOptions const& options) = 0;
};

// The implementations. make_cuda_device throws NoGpu when no GPU can be used.
struct NoGpu {
  std::string reason;
};
std::unique_ptr<Device> make_device();  // the target this binary was built for
int count_gpus();                       // 0 without a usable GPU (and on the simt target)

// Device memory owned by a scope.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Device& device, size_t bytes) : device_(&device), bytes_(bytes), pointer_(device.allocate(bytes)) {}
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      reset();
      device_ = other.device_;
      bytes_ = other.bytes_;
      pointer_ = other.pointer_;
      other.pointer_ = nullptr;
    }
    return *this;
  }

  template <class T = void>
  T* get() const {
    return static_cast<T*>(pointer_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void reset() {
    // On an unusable device a grid may still use it (and cudaFree would wait for that grid): leak it
    if (pointer_ != nullptr && device_->unusable_reason().empty()) device_->release(pointer_);
    pointer_ = nullptr;
  }
  Device* device_ = nullptr;
  size_t bytes_ = 0;
  void* pointer_ = nullptr;
};

}  // namespace epcomm::gpu_check
