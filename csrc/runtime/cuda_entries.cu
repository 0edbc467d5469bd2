// The intranode kernels as cuda-runtime entries (intranode_entries.hpp), for the cuda backend
// (epcomm/backends/cuda_backend.py): grids are launched on the call's stream (the launchers of
// kernels/intranode_launch.cu) and waited for, so a call returns with its outputs written or
// with the kernel's own error. The ErrorSlot is pinned, mapped host memory: the kernel writes
// it over PCIe, the host reads it after the stream is synchronized. No torch headers here.

#include <cuda_runtime.h>

#include <string>

#include "../kernels/intranode.hpp"
#include "device_runtime.hpp"
#include "intranode_entries.hpp"
#include "kernel_entries.hpp"

namespace epcomm::runtime {

namespace {

using entries::LaunchOutcome;

std::string cuda_problem(char const* what, cudaError_t error) {
  return std::string(what) + " failed with " + cudaGetErrorName(error) + ": " + cudaGetErrorString(error);
}

struct CudaTarget {
  static constexpr char const* kKind = "cuda";

  class Slot {
   public:
    Slot() {
      cudaError_t error = cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(kernels::ErrorSlot), cudaHostAllocMapped);
      if (error == cudaSuccess) error = cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0);
      if (error != cudaSuccess) throw RuntimeError(ErrorCode::kSystem, cuda_problem("cudaHostAlloc(ErrorSlot)", error));
      *host_ = kernels::ErrorSlot{};
    }
    ~Slot() { cudaFreeHost(host_); }
    Slot(Slot const&) = delete;
    Slot& operator=(Slot const&) = delete;
    kernels::ErrorSlot* kernel_view() { return device_; }
    kernels::ErrorSlot read() const { return *host_; }  // after the stream synchronized

   private:
    kernels::ErrorSlot* host_ = nullptr;
    kernels::ErrorSlot* device_ = nullptr;
  };

  template <class Args>
  static LaunchOutcome launch(Args const& args, KernelCall const& call) {
    void* const stream = call.stream.native();
    if (int const error = launch_grid(args, stream); error != int(cudaSuccess))
      return {ErrorCode::kKernelFailed, cuda_problem("kernel launch", cudaError_t(error))};
    if (cudaError_t const error = cudaStreamSynchronize(static_cast<cudaStream_t>(stream)); error != cudaSuccess)
      return {ErrorCode::kKernelFailed, cuda_problem("cudaStreamSynchronize", error)};
    return {};
  }

 private:
  static int launch_grid(kernels::NotifyArgs const& args, void* stream) { return kernels::cuda_launch_notify(args, stream); }
  static int launch_grid(kernels::IntranodeDispatchArgs const& args, void* stream) {
    return kernels::cuda_launch_intranode_dispatch(args, stream);
  }
  static int launch_grid(kernels::IntranodeCombineArgs const& args, void* stream) {
    return kernels::cuda_launch_intranode_combine(args, stream);
  }
};

static_assert(entries::DeviceTarget<CudaTarget>);

struct RegisterIntranode {
  RegisterIntranode() { entries::register_intranode_entries<CudaTarget>(); }
} const register_intranode;

}  // namespace

}  // namespace epcomm::runtime
