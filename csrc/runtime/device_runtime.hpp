#pragma once
// The device runtime: one interface, two implementations.
//
//   cpu   (cpu_runtime.cpp, g++):  one process per rank; POSIX shared memory stands in for
//                                  peer-visible GPU memory; kernels run through the SIMT layer.
//   cuda  (cuda_runtime.cu, nvcc): cudaMalloc + CUDA IPC handles; streams, events, <<<>>>.
//
// Life of a runtime (every rank of one NVLink domain does the same, collectively):
//
//   auto runtime = make_cpu_runtime({rank, num_ranks, run_token});
//   runtime->allocate(num_bytes);                  // this rank's buffer, zeroed
//   IpcHandle mine = runtime->export_handle();     // opaque bytes; exchange over the process group
//   runtime->open_peers(all_handles);              // handles[r] from rank r (own entry ignored)
//   ... every rank opened every peer (a collective) ...
//   runtime->release_names();                      // cpu: shm_unlink, nothing can leak from here on
//   runtime->barrier(stream, timeout_s);           // a kernel: release/acquire flags in peer memory
//   runtime->run(stream, spec, params, timeout_s);   // a kernel, chosen by the type of params
//
// Buffer layout per rank: [control region: kControlBytes | data region: num_bytes]. The control
// region belongs to the runtime (the peer barrier's flags); kernels get the data regions through
// peer_data(r) / device_peer_data_table().
//
// Errors are thrown as RuntimeError with an ErrorCode; the Python bindings turn kTimeout into
// EpcommTimeoutError and kNoDevice into EpcommBackendUnavailable.
//
// This header is host-only and free of CUDA and torch headers: g++ (bindings, CPU runtime) and
// nvcc (CUDA runtime) both include it.

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <typeindex>
#include <vector>

namespace epcomm::runtime {

inline constexpr size_t kHandleBytes = 128;      // every IpcHandle, whatever the implementation
inline constexpr int kMaxRanks = 1024;           // ranks of one NVLink domain (barrier flag slots)
inline constexpr size_t kControlBytes = 16384;   // control region before the data region; 4 KiB multiple
static_assert(kMaxRanks * sizeof(uint64_t) <= kControlBytes, "barrier flags must fit the control region");

using IpcHandle = std::array<uint8_t, kHandleBytes>;

/// Errors

enum class ErrorCode {
  kInvalidArgument,  // bad call: wrong sizes, wrong order of calls, unknown kernel
  kNoDevice,         // this implementation cannot run here (no GPU, no driver)
  kSystem,           // an OS or CUDA call failed
  kTimeout,          // a peer did not arrive in time (barrier, kernel timeout, SIMT watchdog)
  kKernelFailed,     // a kernel trapped, raised, or broke a SIMT rule
  kCallRejected,     // a data kernel's call check (kernels/call_check.cuh) said not every rank runs this call:
                     // nothing moved, the buffers stay usable (no peer failed)
  kRecvOverflow,     // a dispatch counted on the device received more rows than its outputs hold (num_worst_tokens):
                     // none past them written; the kernel raised the abort flag (a failure on every rank)
};

char const* error_code_name(ErrorCode code);

class RuntimeError : public std::runtime_error {
 public:
  RuntimeError(ErrorCode code, std::string const& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

/// Streams and events

// An in-order queue of device work. cpu: work runs synchronously on the calling thread, in order
// (the queue is always empty when a call returns). cuda: a non-blocking cudaStream_t.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual void synchronize() = 0;
  virtual void* native() const = 0;  // cudaStream_t on cuda; nullptr on cpu
};

// A point in a stream. cpu: the time the work before it finished; cuda: a cudaEvent_t.
class Event {
 public:
  virtual ~Event() = default;
  virtual void record(Stream& stream) = 0;
  virtual void synchronize() = 0;
  virtual bool query() = 0;                                  // true once the recorded work finished
  virtual double elapsed_ms_since(Event const& start) const = 0;  // both recorded and finished
};

/// The runtime

struct RuntimeOptions {
  int rank = 0;
  int num_ranks = 1;
  std::string run_token;  // the same on every rank of one run: names the cpu segments (hex, <= 32 chars)
  int device = -1;        // cuda: the device to use (-1: the current one); ignored by cpu
  // Ranks per node (0: every rank on one node). cuda: open_peers maps this node's ranks only (CUDA IPC
  // does not reach other nodes; the network does, open_network). cpu: ignored, every rank maps every rank.
  int num_nvl_ranks = 0;
};

class GinNetwork;  // gin_network.hpp: the cuda runtime's network across nodes

class DeviceRuntime;

// What a registered kernel entry gets besides its typed spec and params: the runtime (peer
// tables, rank), the stream to launch on, the time limit for peer waits, and whether the call only
// enqueues the kernel (the runtime then reports its outcome later: DeviceRuntime::check_pending).
struct KernelCall {
  DeviceRuntime& runtime;
  Stream& stream;
  double timeout_s;
  bool enqueue_only = false;
  // `stream` is capturing a CUDA graph (enqueue-only calls only): the kernel writes the runtime's
  // captured-kernel ErrorSlot (DeviceRuntime::captured_error_slot) and nothing is kept to report.
  bool capturing = false;
};

/// The host's wait for device work

using HostClock = std::chrono::steady_clock;

inline HostClock::time_point deadline_after(double seconds) {
  return HostClock::now() + std::chrono::duration_cast<HostClock::duration>(std::chrono::duration<double>(seconds));
}

// Polls `done()` until it returns true or `deadline` passes; returns whether it did. Yields for the first
// 200 us (short kernels end there), then sleeps 50 us between polls. How the host waits for a grid: a
// synchronous launch (cuda_target.hpp) and an enqueued kernel's report (check_pending) alike.
template <class Done>
bool poll_until(Done&& done, HostClock::time_point deadline) {
  HostClock::time_point const start = HostClock::now();
  for (;;) {
    if (done()) return true;
    HostClock::time_point const now = HostClock::now();
    if (now >= deadline) return false;
    if (now - start < std::chrono::microseconds(200))
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// A kernel launched without waiting for it (KernelCall::enqueue_only), as the runtime keeps it until
// its outcome is reported: its ErrorSlot, a marker after it in its stream, its host deadline.
class PendingKernel {
 public:
  virtual ~PendingKernel() = default;
  // Whether its stream has passed it (never blocks). Throws what the stream reports (cuda: an
  // asynchronous fault such as an illegal address, which makes the context unusable).
  virtual bool finished() = 0;
  // Once finished(): throws the kernel's error (its ErrorSlot), if any.
  virtual void report() = 0;
  // Its deadline passed while it still runs: never reuse its ErrorSlot, end the transport's waits it may
  // be stuck in (GIN: abort the communicator), and throw RuntimeError(kTimeout).
  virtual void give_up() = 0;
  virtual HostClock::time_point deadline() const = 0;
};

// A kernel is named by the type of its parameters (kernels/intranode.hpp, internode.hpp):
// `Params` has named fields (the one argument list of that kernel), `Params::Spec` the workspace
// spec it runs with, `Params::kName` the name errors and listings use. An entry turns them into
// the kernel's Args (adding the runtime's peer tables and error slot) and launches it.
template <class Params>
using KernelEntry = std::function<void(KernelCall const&, typename Params::Spec const&, Params const&)>;

namespace detail {
void register_entry(std::string const& kind, std::type_index params, char const* name, std::shared_ptr<void const> entry);
// The entry of `params` for runtimes of `kind`; throws kInvalidArgument naming the registered ones.
std::shared_ptr<void const> find_entry(std::string const& kind, std::type_index params, char const* name);
}  // namespace detail

class DeviceRuntime {
 public:
  virtual ~DeviceRuntime() = default;
  DeviceRuntime(DeviceRuntime const&) = delete;
  DeviceRuntime& operator=(DeviceRuntime const&) = delete;

  virtual char const* kind() const = 0;  // "cpu" or "cuda"
  int rank() const { return options_.rank; }
  int num_ranks() const { return options_.num_ranks; }

  // Allocates this rank's peer-visible buffer: control region + num_bytes of data, zeroed. Once.
  virtual void allocate(size_t num_bytes) = 0;
  // This rank's buffer as kHandleBytes opaque bytes, for the peers' open_peers.
  virtual IpcHandle export_handle() const = 0;
  // Maps every peer's buffer; handles[r] came from rank r's export_handle (own entry only checked).
  virtual void open_peers(std::vector<IpcHandle> const& handles) = 0;
  // Call once every rank has opened every peer: drops the names peers opened the buffer by
  // (cpu: shm_unlink), so nothing outlives the processes. Mappings stay valid.
  virtual void release_names() = 0;
  // Teardown. No rank may free its buffer while a peer still maps it (for CUDA IPC that is undefined
  // behaviour), so a collective teardown is: every rank close_peers(), a host barrier, every rank
  // close() (SimRuntime.close(collective=True) in Python). A rank that cannot meet its peers
  // (garbage collection, a failed peer) calls abandon() instead.
  //
  // Unmaps every peer's buffer (and the device peer tables); this rank's own stays. Idempotent.
  virtual void close_peers() = 0;
  // Unmaps and frees everything. Only once every peer has closed its mappings of this buffer (see
  // above), or when no peer ever mapped it. Idempotent.
  virtual void close() = 0;
  // Teardown without the peers: closes the peer mappings and drops this rank's buffer without freeing
  // memory a peer may still map (cuda: the allocation is left to the process's exit; cpu: munmap, as
  // POSIX keeps the pages while a peer maps them). Also what the destructor does when close() was not
  // called. Idempotent.
  virtual void abandon() = 0;

  // The network between nodes, collective over every rank of every node (cuda: an NCCL communicator made
  // from `network_id`, which rank 0 made with create_network_id() and every rank got from it, and a GIN
  // session: an RDMA window of rdma_bytes and num_signals signals; gin_network.hpp). Throws kNoDevice
  // where there is none: the cpu runtime (its ShmTransport reaches every rank's mapped buffer), or a cuda
  // build without NCCL's headers. Call after open_peers; once per runtime (a new window: a new runtime).
  virtual void open_network(std::array<uint8_t, kHandleBytes> const& network_id, size_t rdma_bytes, int num_signals,
                            double timeout_s);
  // The network open_network made, or null.
  virtual GinNetwork* network() const { return nullptr; }

  size_t num_bytes() const { return num_bytes_; }
  bool peers_open() const { return peers_open_; }
  // The data region of rank r's buffer as mapped in this process (device pointers on cuda).
  void* peer_data(int rank) const;
  void* local_data() const { return peer_data(rank()); }
  // Device-accessible arrays of num_ranks pointers: every rank's data region / control region (cuda across
  // nodes: null for the ranks of other nodes, which are not mapped).
  virtual void* const* device_peer_data_table() const = 0;
  virtual uint64_t* const* device_peer_flag_table() const = 0;

  // Zeroes num_bytes of this rank's data region from offset, in stream order.
  virtual void zero(Stream& stream, size_t offset, size_t num_bytes) = 0;
  // Zeroes this rank's RDMA window of the network (a re-layout), in stream order; nothing without a network.
  virtual void zero_network(Stream& /*stream*/) {}

  virtual std::unique_ptr<Stream> create_stream() = 0;
  // A stream this runtime does not own (cuda: the cudaStream_t `native`, e.g. torch's current stream;
  // it must outlive the wrapper and every kernel launched on it). cpu: a stream like any other (work
  // runs at once on the calling thread), `native` ignored.
  virtual std::unique_ptr<Stream> borrow_stream(void* native) = 0;
  virtual std::unique_ptr<Event> create_event() = 0;
  // An event only to record, query and synchronize (no timing: elapsed_ms_since may throw), as the marker after
  // an enqueued kernel; an implementation may reuse its events (cuda: a pool, no driver call per kernel).
  virtual std::unique_ptr<Event> create_marker() { return create_event(); }
  Stream& default_stream() { return *default_stream_; }

  // clock64() ticks per second inside kernels (cpu: 1e9, the SIMT clock is in ns; cuda: SM clock).
  virtual double clock_ticks_per_second() const = 0;

  // All ranks meet: a kernel (peer_barrier.cuh) release-stores this barrier's epoch into every
  // peer's control region and acquire-polls its own. Throws RuntimeError(kTimeout) naming the
  // peers that did not arrive within timeout_s. Synchronous: returns after the kernel finished.
  void barrier(Stream& stream, double timeout_s);

  // Runs the kernel registered for Params on this runtime's kind (see register_kernel). `enqueue_only`:
  // returns once the kernel is launched (cuda: in `stream`'s order, the host does not wait), and its
  // ErrorSlot is read later by check_pending; otherwise returns when it finished, throwing its error.
  // Either way the outcomes of earlier enqueued kernels that have finished are reported first
  // (check_pending(false)), so an enqueued kernel's error reaches the caller at the latest at the
  // runtime's next call.
  template <class Params>
  void run(Stream& stream, typename Params::Spec const& spec, Params const& params, double timeout_s,
           bool enqueue_only = false) {
    auto const entry = std::static_pointer_cast<KernelEntry<Params> const>(
        detail::find_entry(kind(), typeid(Params), Params::kName));
    bool const capturing = stream_is_capturing(stream);
    if (capturing && !enqueue_only)
      throw RuntimeError(ErrorCode::kInvalidArgument,
                         std::string("epcomm ") + Params::kName + " on rank " + std::to_string(rank()) +
                             ": the host waits for this kernel, which a stream capturing a CUDA graph cannot do");
    if (!capturing) check_pending(false);
    (*entry)(KernelCall{*this, stream, timeout_s, enqueue_only, capturing}, spec, params);
    // the host waited for the stream: the kernels enqueued before in it have ended, report them now (under
    // this call) rather than at the next one
    if (!enqueue_only) check_pending(false);
  }

  // Whether `stream` is capturing a CUDA graph (cuda: cudaStreamIsCapturing; cpu: never).
  virtual bool stream_is_capturing(Stream& /*stream*/) const { return false; }
  // The ErrorSlot (a kernels::ErrorSlot in mapped host memory: host and device views) every kernel captured
  // in a CUDA graph writes: a replay runs the kernels with the arguments they were captured with, so the
  // slot must outlive every replay. check_pending reads it at every call outside a capture (report_captured).
  // cpu: none (it never captures).
  struct MappedSlot {
    void* host = nullptr;
    void* device = nullptr;
  };
  virtual MappedSlot captured_error_slot() {
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string("the ") + kind() + " runtime captures no CUDA graph");
  }

  // Keeps an enqueued kernel until check_pending reports it (an entry's job, kernel_entries.hpp).
  void defer(std::unique_ptr<PendingKernel> kernel) {
    std::lock_guard<std::mutex> const lock(pending_mutex_);
    pending_.push_back(std::move(kernel));
  }
  // Reports the enqueued kernels, oldest first: drops every one that finished (throwing the first error
  // among them once all are dropped) or whose host deadline passed (give_up). `wait`: blocks until every
  // one has finished or passed its deadline (polling, like a synchronous launch); otherwise never blocks.
  void check_pending(bool wait);
  // Teardown: waits for every enqueued kernel (against its deadline) and drops what they report; no kernel may
  // use the buffers, peer tables or network past this. What close(), close_peers() and abandon() of the
  // bindings do first.
  void drain_pending() noexcept;
  size_t num_pending() const {
    std::lock_guard<std::mutex> const lock(pending_mutex_);
    return pending_.size();
  }

 protected:
  explicit DeviceRuntime(RuntimeOptions options);
  // Launches the peer barrier kernel for `epoch` and waits for it; returns whether it timed out.
  virtual bool launch_peer_barrier(Stream& stream, uint64_t epoch, double timeout_s) = 0;
  // This rank's barrier flags (control region), read back after a timeout to name the missing peers.
  virtual std::vector<uint64_t> read_own_flags() = 0;
  void check_state(char const* call, bool need_allocated, bool need_peers) const;

  // The checks of open_peers both implementations share: called once, one handle per rank, each an
  // implementation `Handle` (fields magic, version, rank) of this `kind` naming its own rank, in order.
  template <class Handle>
  std::vector<Handle> decode_peer_handles(std::vector<IpcHandle> const& handles, uint32_t magic, uint32_t version,
                                          char const* kind) const {
    static_assert(sizeof(Handle) <= kHandleBytes, "an implementation's handle must fit an IpcHandle");
    if (peers_open_) throw RuntimeError(ErrorCode::kInvalidArgument, "open_peers: already called");
    if (handles.size() != size_t(num_ranks()))
      throw RuntimeError(ErrorCode::kInvalidArgument, "open_peers: expected " + std::to_string(num_ranks()) +
                                                          " handles (one per rank), got " + std::to_string(handles.size()));
    std::vector<Handle> decoded(handles.size());
    for (int peer = 0; peer < num_ranks(); ++peer) {
      Handle& handle = decoded[size_t(peer)];
      std::memcpy(&handle, handles[size_t(peer)].data(), sizeof(handle));
      std::string const where = "open_peers: rank " + std::to_string(peer) + "'s handle";
      if (handle.magic != magic || handle.version != version)
        throw RuntimeError(ErrorCode::kInvalidArgument,
                           where + " is not a " + kind + " runtime handle (another runtime's, or garbage?)");
      if (handle.rank != peer)
        throw RuntimeError(ErrorCode::kInvalidArgument, where + " says it is rank " + std::to_string(handle.rank) +
                                                            " (handles must be ordered by rank)");
    }
    return decoded;
  }

  RuntimeOptions options_;
  size_t num_bytes_ = 0;
  bool allocated_ = false;
  bool peers_open_ = false;
  std::vector<void*> peer_data_;  // num_ranks entries once peers are open (own entry from allocate)
  std::unique_ptr<Stream> default_stream_;
  uint64_t barrier_epoch_ = 0;
  // Throws the error a kernel replayed from a CUDA graph left in captured_error_slot() (then clears it);
  // called by check_pending. cpu: nothing.
  virtual void report_captured() {}

  std::vector<std::unique_ptr<PendingKernel>> pending_;  // enqueued kernels not yet reported, oldest first
  mutable std::mutex pending_mutex_;  // a thread may wait on an event (check_pending) while another calls
};

// The implementations. make_cuda_runtime throws RuntimeError(kNoDevice) without a usable GPU.
std::unique_ptr<DeviceRuntime> make_cpu_runtime(RuntimeOptions const& options);
std::unique_ptr<DeviceRuntime> make_cuda_runtime(RuntimeOptions const& options);

// POSIX shared-memory segment name of `rank` in run `run_token` ("/epcomm-<token>-<rank>").
std::string cpu_segment_name(std::string const& run_token, int rank);
// Failure cleanup: shm_unlinks every rank's segment of a run (missing ones are fine); returns how
// many were removed. Any rank can do it for all, because names follow from the token.
int cpu_unlink_segments(std::string const& run_token, int num_ranks);

/// Kernel registry

// Makes the kernel of Params runnable by DeviceRuntime::run on runtimes of kind `kind` ("cpu" /
// "cuda"). The entries register themselves (runtime/cpu_entries.cpp, cuda_entries.cu).
// Registering Params twice for one kind replaces the entry.
template <class Params>
void register_kernel(std::string const& kind, KernelEntry<Params> entry) {
  detail::register_entry(kind, typeid(Params), Params::kName,
                         std::make_shared<KernelEntry<Params> const>(std::move(entry)));
}
// The names (Params::kName) of the kernels registered for `kind`, sorted.
std::vector<std::string> registered_kernels(std::string const& kind);

}  // namespace epcomm::runtime
