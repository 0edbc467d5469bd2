// The cuda DeviceRuntime (device_runtime.hpp): cudaMalloc'ed buffers shared through CUDA IPC
// handles, cudaStream_t / cudaEvent_t, kernels launched with <<<>>>. Compiled by nvcc; no torch
// headers here (they would multiply the compile time).
//
// Without a usable GPU every entry point fails with RuntimeError(kNoDevice): the process has no
// CUDA driver (cudaErrorInsufficientDriver, 35) or no device (cudaErrorNoDevice, 100).
//
// Across nodes (RuntimeOptions::num_nvl_ranks < num_ranks): CUDA IPC reaches this node's GPUs only, so
// open_peers maps the ranks of this node (node * L .. node * L + L - 1) and leaves the others' table
// entries null; the peer barrier runs over this node's ranks (the Python side meets the other nodes on
// the host after it); the network between nodes is a GinNetwork (gin_network.hpp, open_network), whose
// teardown is collective and runs in close_peers, before the IPC mappings go.

#include <cuda_runtime.h>
#include <unistd.h>

#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "cuda_target.hpp"
#include "device_runtime.hpp"
#include "gin_network.hpp"
#include "peer_barrier.cuh"

namespace epcomm::runtime {

namespace {

constexpr uint32_t kCudaHandleMagic = 0x4d534443;  // "CDSM"
constexpr uint32_t kCudaHandleVersion = 1;

// The wire form of a cuda IpcHandle.
struct CudaHandle {
  uint32_t magic;
  uint32_t version;
  uint64_t total_bytes;
  int32_t rank;
  int32_t pid;
  cudaIpcMemHandle_t ipc;  // 64 bytes
};
static_assert(sizeof(CudaHandle) <= kHandleBytes, "CudaHandle must fit an IpcHandle");

bool is_no_device(cudaError_t error) {
  return error == cudaErrorInsufficientDriver || error == cudaErrorNoDevice || error == cudaErrorDevicesUnavailable;
}

void check_cuda(cudaError_t error, char const* what) {
  if (error == cudaSuccess) return;
  std::string const detail = std::string(cudaGetErrorName(error)) + " (" + std::to_string(int(error)) + "): " +
                             cudaGetErrorString(error);
  if (is_no_device(error))
    throw RuntimeError(ErrorCode::kNoDevice,
                       "no CUDA GPU/driver on this machine: use backend='sim' or 'torch' (" + std::string(what) +
                           " failed with " + detail + ")");
  throw RuntimeError(ErrorCode::kSystem, std::string(what) + " failed with " + detail);
}

class CudaStream final : public Stream {
 public:
  CudaStream() { check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
  ~CudaStream() override { cudaStreamDestroy(stream_); }
  void synchronize() override { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  void* native() const override { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// A stream the runtime does not own (borrow_stream): torch's current stream, for kernels in its order.
class BorrowedCudaStream final : public Stream {
 public:
  explicit BorrowedCudaStream(cudaStream_t stream) : stream_(stream) {}
  void synchronize() override { check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  void* native() const override { return stream_; }

 private:
  cudaStream_t stream_;
};

cudaStream_t native_stream(Stream& stream) { return static_cast<cudaStream_t>(stream.native()); }

// What every cuda Event does with its cudaEvent_t; the subclasses own it differently.
class CudaEventBase : public Event {
 public:
  void record(Stream& stream) override { check_cuda(cudaEventRecord(event_, native_stream(stream)), "cudaEventRecord"); }
  void synchronize() override { check_cuda(cudaEventSynchronize(event_), "cudaEventSynchronize"); }
  bool query() override {
    cudaError_t const error = cudaEventQuery(event_);
    if (error == cudaErrorNotReady) return false;
    check_cuda(error, "cudaEventQuery");
    return true;
  }

 protected:
  cudaEvent_t event_ = nullptr;
};

class CudaEvent final : public CudaEventBase {
 public:
  CudaEvent() { check_cuda(cudaEventCreate(&event_), "cudaEventCreate"); }
  ~CudaEvent() override { cudaEventDestroy(event_); }
  double elapsed_ms_since(Event const& start) const override {
    auto const* other = dynamic_cast<CudaEvent const*>(&start);
    if (other == nullptr) throw RuntimeError(ErrorCode::kInvalidArgument, "elapsed_ms_since: start is not a cuda event");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, other->event_, event_), "cudaEventElapsedTime");
    return ms;
  }
};

// Timing-free events lent as markers (DeviceRuntime::create_marker) and taken back when the marker dies, so an
// enqueued kernel costs no cudaEventCreate/Destroy (driver calls) once the pool holds as many as are ever
// pending at once. Shared by the pool's markers, which may outlive the runtime's own members (the pending
// list is the base class's). Re-recording a taken-back event is legal even if its last record never finished
// (a given-up kernel): a record overwrites the event's state.
class MarkerPool final {
 public:
  ~MarkerPool() {
    for (cudaEvent_t event : pool_.take_all()) cudaEventDestroy(event);
  }
  cudaEvent_t take() { return pool_.take(); }
  void give_back(cudaEvent_t event) noexcept { pool_.give_back(event); }

 private:
  ReusePool<cudaEvent_t> pool_{[] {
    cudaEvent_t event = nullptr;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return event;
  }};
};

class PooledMarker final : public CudaEventBase {
 public:
  explicit PooledMarker(std::shared_ptr<MarkerPool> pool) : pool_(std::move(pool)) { event_ = pool_->take(); }
  ~PooledMarker() override { pool_->give_back(event_); }
  double elapsed_ms_since(Event const&) const override {
    throw RuntimeError(ErrorCode::kInvalidArgument, "elapsed_ms_since: a marker event has no timing");
  }

 private:
  std::shared_ptr<MarkerPool> pool_;
};

class CudaRuntime final : public DeviceRuntime {
 public:
  explicit CudaRuntime(RuntimeOptions const& options) : DeviceRuntime(options) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (count == 0) check_cuda(cudaErrorNoDevice, "cudaGetDeviceCount");
    if (options_.device >= 0) check_cuda(cudaSetDevice(options_.device), "cudaSetDevice");
    check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    num_nvl_ranks_ = options_.num_nvl_ranks > 0 ? options_.num_nvl_ranks : num_ranks();
    if (num_ranks() % num_nvl_ranks_ != 0)
      throw RuntimeError(ErrorCode::kInvalidArgument, "num_nvl_ranks=" + std::to_string(num_nvl_ranks_) +
                                                          " does not divide num_ranks=" + std::to_string(num_ranks()));
    int clock_khz = 0;
    check_cuda(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device_), "cudaDeviceGetAttribute(clock rate)");
    ticks_per_second_ = double(clock_khz) * 1e3;
    default_stream_ = std::make_unique<CudaStream>();
    check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&status_), sizeof(PeerBarrierStatus), cudaHostAllocMapped),
               "cudaHostAlloc(barrier status)");
    check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_status_), status_, 0),
               "cudaHostGetDevicePointer");
  }
  ~CudaRuntime() override {
    abandon();  // a no-op after close(); otherwise never free what a peer may still map
    if (status_ != nullptr) cudaFreeHost(status_);
  }

  char const* kind() const override { return "cuda"; }

  void allocate(size_t num_bytes) override {
    if (allocated_ || closed_) throw RuntimeError(ErrorCode::kInvalidArgument, "allocate: already called (once per runtime)");
    total_bytes_ = kControlBytes + num_bytes;
    check_cuda(cudaMalloc(&local_base_, total_bytes_), "cudaMalloc(NVL buffer)");
    // Zeroed and finished before the handle is exported: a plain cudaMemset may still be running when
    // it returns, and a peer's first flag write must not be overwritten by it.
    check_cuda(cudaMemsetAsync(local_base_, 0, total_bytes_, native_stream(default_stream())), "cudaMemsetAsync(NVL buffer)");
    default_stream().synchronize();
    // before any capture (a pinned allocation inside one may be refused); one per runtime, never freed (like
    // the pool's). A graph must not be replayed after its runtime closed: its kernels point at the freed
    // buffers (the Python side refuses to replace a runtime that captured kernels use)
    captured_slot_ = ErrorSlotPool::instance().take();
    *captured_slot_.host = kernels::ErrorSlot{};
    num_bytes_ = num_bytes;
    bases_.assign(size_t(num_ranks()), nullptr);
    bases_[size_t(rank())] = local_base_;
    peer_data_.assign(size_t(num_ranks()), nullptr);
    peer_data_[size_t(rank())] = static_cast<char*>(local_base_) + kControlBytes;
    allocated_ = true;
  }

  IpcHandle export_handle() const override {
    check_state("export_handle", true, false);
    CudaHandle handle{};
    handle.magic = kCudaHandleMagic;
    handle.version = kCudaHandleVersion;
    handle.total_bytes = total_bytes_;
    handle.rank = rank();
    handle.pid = int32_t(getpid());
    check_cuda(cudaIpcGetMemHandle(&handle.ipc, local_base_), "cudaIpcGetMemHandle");
    IpcHandle bytes{};
    std::memcpy(bytes.data(), &handle, sizeof(handle));
    return bytes;
  }

  void open_peers(std::vector<IpcHandle> const& handles) override {
    check_state("open_peers", true, false);
    std::vector<CudaHandle> const decoded =
        decode_peer_handles<CudaHandle>(handles, kCudaHandleMagic, kCudaHandleVersion, "cuda");
    for (int peer = 0; peer < num_ranks(); ++peer) {
      CudaHandle const& handle = decoded[size_t(peer)];
      if (handle.total_bytes != total_bytes_)
        throw RuntimeError(ErrorCode::kInvalidArgument,
                           "open_peers: rank " + std::to_string(peer) + "'s buffer has " +
                               std::to_string(handle.total_bytes) + " bytes, this rank's " + std::to_string(total_bytes_) +
                               " (every rank allocates the same size)");
      if (peer == rank() || !on_this_node(peer)) continue;  // other nodes: through the network only
      void* base = nullptr;
      cudaError_t const opened = cudaIpcOpenMemHandle(&base, handle.ipc, cudaIpcMemLazyEnablePeerAccess);
      if (opened != cudaSuccess && !is_no_device(opened))
        // Refused IPC (a container without a shared IPC namespace, GPUs without peer access, a wrong
        // num_nvl_ranks putting another node's rank here): this machine cannot run the backend as asked.
        throw RuntimeError(ErrorCode::kNoDevice,
                           "CUDA IPC refused: cudaIpcOpenMemHandle(rank " + std::to_string(peer) + ", pid " +
                               std::to_string(handle.pid) + ") failed with " + cudaGetErrorName(opened) + ": " +
                               cudaGetErrorString(opened) + " (are ranks " + std::to_string(first_node_rank()) + ".." +
                               std::to_string(first_node_rank() + num_nvl_ranks_ - 1) +
                               " on one machine, with peer access between their GPUs? num_nvl_ranks=" +
                               std::to_string(num_nvl_ranks_) + ")");
      check_cuda(opened, ("cudaIpcOpenMemHandle(rank " + std::to_string(peer) + ")").c_str());
      bases_[size_t(peer)] = base;
      peer_data_[size_t(peer)] = static_cast<char*>(base) + kControlBytes;
    }
    // Device-side pointer tables for kernels
    // [R] by world rank; null for the ranks of other nodes (never mapped, never read by a kernel)
    std::vector<uint64_t*> flags(static_cast<size_t>(num_ranks()));
    for (int peer = 0; peer < num_ranks(); ++peer) flags[size_t(peer)] = static_cast<uint64_t*>(bases_[size_t(peer)]);
    size_t const table_bytes = sizeof(void*) * size_t(num_ranks());
    check_cuda(cudaMalloc(&device_data_table_, table_bytes), "cudaMalloc(peer table)");
    check_cuda(cudaMalloc(&device_flag_table_, table_bytes), "cudaMalloc(flag table)");
    // On the runtime's stream, then waited for: a pageable cudaMemcpy on the legacy stream may return
    // before its DMA lands, and the kernels' non-blocking streams are not ordered after it.
    cudaStream_t const setup = native_stream(default_stream());
    check_cuda(cudaMemcpyAsync(device_data_table_, peer_data_.data(), table_bytes, cudaMemcpyHostToDevice, setup),
               "cudaMemcpyAsync(peer table)");
    check_cuda(cudaMemcpyAsync(device_flag_table_, flags.data(), table_bytes, cudaMemcpyHostToDevice, setup),
               "cudaMemcpyAsync(flag table)");
    default_stream().synchronize();  // also keeps the pageable sources alive long enough
    peers_open_ = true;
  }

  void release_names() override {}  // IPC handles need no cleanup: the allocation owns them

  void open_network(NetworkId const& network_id, size_t rdma_bytes, int num_signals, double timeout_s) override {
    check_state("open_network", true, true);
    if (network_ != nullptr)
      throw RuntimeError(ErrorCode::kInvalidArgument, "open_network: already called (once per runtime)");
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");  // NCCL binds the communicator to the current device
    network_ = std::make_unique<GinNetwork>(network_id, rank(), num_ranks(), rdma_bytes, num_signals, timeout_s);
    network_timeout_s_ = timeout_s;
  }

  GinNetwork* network() const override { return network_.get(); }

  // Peers' IPC mappings and the device peer tables (which point into them); this rank's buffer stays.
  // Across nodes first the network, collectively (every rank's close_peers is part of the collective
  // teardown): after this rank's stream is idle, as GinSession::close requires. A failed network
  // teardown aborts the communicator, still unmaps the peers, then throws. A network aborted after a host
  // timeout is only dropped: its kernel may still run, so the stream is not waited for.
  void close_peers() override {
    std::string network_failure;
    if (network_ != nullptr && !network_->usable()) network_.reset();
    if (network_ != nullptr) {
      try {
        default_stream().synchronize();
        network_->close(network_timeout_s_);
      } catch (std::exception const& error) {
        network_->abort();
        network_failure = error.what();
      }
      network_.reset();
    }
    unmap_peers();
    if (!network_failure.empty()) throw RuntimeError(ErrorCode::kSystem, "close_peers: " + network_failure);
  }

  void unmap_peers() {
    for (int peer = 0; peer < int(bases_.size()); ++peer) {
      if (peer == rank() || bases_[size_t(peer)] == nullptr) continue;
      cudaIpcCloseMemHandle(bases_[size_t(peer)]);
      bases_[size_t(peer)] = nullptr;
      if (size_t(peer) < peer_data_.size()) peer_data_[size_t(peer)] = nullptr;
    }
    if (device_data_table_ != nullptr) cudaFree(device_data_table_);
    if (device_flag_table_ != nullptr) cudaFree(device_flag_table_);
    device_data_table_ = device_flag_table_ = nullptr;
    peers_open_ = false;
  }

  // After every peer's close_peers (a host barrier between): the own buffer can be freed.
  void close() override { release(/*free_own=*/true); }

  // Without the peers: they may still map this buffer, so it is not freed (the process's exit releases it).
  void abandon() override { release(/*free_own=*/false); }

  void release(bool free_own) {
    if (closed_) return;
    closed_ = true;
    if (network_ != nullptr) {
      // Still open: close_peers (the collective part) was skipped, so the peers may not be there to
      // meet: abort, which is local and never waits (abandon, the destructor, a close without close_peers).
      network_->abort();
      network_.reset();
    }
    unmap_peers();
    if (free_own && local_base_ != nullptr) cudaFree(local_base_);
    local_base_ = nullptr;
    bases_.clear();
    peer_data_.clear();
    allocated_ = peers_open_ = false;
  }

  void* const* device_peer_data_table() const override {
    check_state("device_peer_data_table", true, true);
    return static_cast<void* const*>(device_data_table_);
  }
  uint64_t* const* device_peer_flag_table() const override {
    check_state("device_peer_flag_table", true, true);
    return static_cast<uint64_t* const*>(device_flag_table_);
  }

  void zero(Stream& stream, size_t offset, size_t num_bytes) override {
    check_state("zero", true, false);
    if (offset > num_bytes_ || num_bytes > num_bytes_ - offset)
      throw RuntimeError(ErrorCode::kInvalidArgument, "zero: range outside the " + std::to_string(num_bytes_) + "-byte buffer");
    check_cuda(cudaMemsetAsync(static_cast<char*>(local_data()) + offset, 0, num_bytes, native_stream(stream)),
               "cudaMemsetAsync");
  }

  void zero_network(Stream& stream) override {
    if (network_ == nullptr || !network_->usable()) return;
    check_cuda(cudaMemsetAsync(network_->local_buffer(), 0, network_->rdma_bytes(), native_stream(stream)),
               "cudaMemsetAsync(RDMA window)");
  }

  std::unique_ptr<Stream> create_stream() override { return std::make_unique<CudaStream>(); }
  std::unique_ptr<Stream> borrow_stream(void* native) override {
    return std::make_unique<BorrowedCudaStream>(static_cast<cudaStream_t>(native));
  }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CudaEvent>(); }
  std::unique_ptr<Event> create_marker() override { return std::make_unique<PooledMarker>(markers_); }
  double clock_ticks_per_second() const override { return ticks_per_second_; }

  bool stream_is_capturing(Stream& stream) const override {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(native_stream(stream), &status), "cudaStreamIsCapturing");
    return status != cudaStreamCaptureStatusNone;
  }
  MappedSlot captured_error_slot() override {
    check_state("a captured kernel", true, false);
    return {captured_slot_.host, captured_slot_.device};
  }

 protected:
  // A replayed kernel's error: read while replays may still run, so a slot still being written (claimed) is
  // left for the next call; a complete one is cleared and thrown (later failures of the same replays are
  // dropped, as in any ErrorSlot: the first failure is the cause).
  void report_captured() override {
    if (captured_slot_.host == nullptr) return;
    // the kernel release-stores `code` after the other fields (report_failure)
    kernels::ErrorSlot* const slot = captured_slot_.host;
    int32_t code = __atomic_load_n(&slot->code, __ATOMIC_ACQUIRE);
    if (code == 0 || code == kernels::kErrorSlotClaimed) return;
    kernels::ErrorSlot const seen = *slot;
    // While `code` is set no kernel writes the other fields (their claim needs code == 0): clear them first, then
    // release `code` last, so a kernel claiming the slot right after writes a whole new report.
    kernels::ErrorSlot cleared{};
    cleared.code = code;
    *slot = cleared;
    __atomic_compare_exchange_n(&slot->code, &code, 0, false, __ATOMIC_RELEASE, __ATOMIC_RELAXED);
    entries::finish("graph-replayed kernel", rank(), entries::LaunchOutcome{ErrorCode::kKernelFailed, ""}, seen);
  }

  // Over this node's ranks: their flag slots are indexed by local rank (the kernel sees a node of L ranks).
  // Across nodes the Python side meets the other nodes on the host after it (CudaRuntime.barrier).
  bool launch_peer_barrier(Stream& stream, uint64_t epoch, double timeout_s) override {
    status_->timed_out = 0;
    PeerBarrierArgs args{static_cast<uint64_t* const*>(device_flag_table_) + first_node_rank(),
                         static_cast<uint64_t*>(local_base_), device_status_, rank() - first_node_rank(),
                         num_nvl_ranks_, epoch, (long long)(timeout_s * ticks_per_second_)};
    peer_barrier_kernel<<<1, kPeerBarrierThreads, 0, native_stream(stream)>>>(args);
    check_cuda(cudaGetLastError(), "peer_barrier launch");
    // Polled against the host deadline, not cudaStreamSynchronize: enqueued kernels may run before the barrier
    // in its stream, and one stuck inside NCCL (a GIN wait towards a dead peer) would hang the host.
    entries::LaunchOutcome const outcome = CudaTarget::wait_with_deadline(native_stream(stream), timeout_s);
    if (!outcome.problem.empty()) {
      if (outcome.grid_may_still_run && network_ != nullptr) network_->abort();  // end NCCL's own waits
      throw RuntimeError(outcome.code, "epcomm peer_barrier on rank " + std::to_string(rank()) + ": " + outcome.problem);
    }
    return status_->timed_out != 0;
  }

  // By world rank: slot i of this node's barrier is rank first_node_rank() + i; ranks of other nodes
  // take no part in it and read as arrived.
  std::vector<uint64_t> read_own_flags() override {
    std::vector<uint64_t> slots(static_cast<size_t>(num_nvl_ranks_));
    // after the barrier kernel (synchronized on its stream); read on the runtime's stream, not the legacy one
    check_cuda(cudaMemcpyAsync(slots.data(), local_base_, slots.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost,
                               native_stream(default_stream())),
               "cudaMemcpyAsync(barrier flags)");
    default_stream().synchronize();
    std::vector<uint64_t> flags(static_cast<size_t>(num_ranks()), std::numeric_limits<uint64_t>::max());
    for (int local = 0; local < num_nvl_ranks_; ++local) flags[size_t(first_node_rank() + local)] = slots[size_t(local)];
    return flags;
  }

 private:
  int first_node_rank() const { return rank() / num_nvl_ranks_ * num_nvl_ranks_; }
  bool on_this_node(int peer) const { return peer / num_nvl_ranks_ == rank() / num_nvl_ranks_; }

  int device_ = 0;
  int num_nvl_ranks_ = 1;
  std::unique_ptr<GinNetwork> network_;  // across nodes, once open_network ran
  double network_timeout_s_ = 0;
  double ticks_per_second_ = 1e9;
  bool closed_ = false;
  size_t total_bytes_ = 0;
  void* local_base_ = nullptr;
  std::vector<void*> bases_;  // every rank's whole buffer (control + data)
  void* device_data_table_ = nullptr;
  void* device_flag_table_ = nullptr;
  ErrorSlotPool::Mapped captured_slot_;         // what kernels captured in a CUDA graph write (allocate)
  std::shared_ptr<MarkerPool> markers_ = std::make_shared<MarkerPool>();  // enqueued kernels' markers
  PeerBarrierStatus* status_ = nullptr;         // host view (mapped, pinned)
  PeerBarrierStatus* device_status_ = nullptr;  // device view
};

}  // namespace

std::unique_ptr<DeviceRuntime> make_cuda_runtime(RuntimeOptions const& options) {
  return std::make_unique<CudaRuntime>(options);
}

}  // namespace epcomm::runtime
