// Python bindings of the device runtime (csrc/runtime/device_runtime.hpp), compiled into both
// extension modules: epcomm._C (EPCOMM_WITH_CPU_RUNTIME: the cpu runtime, kernels on the SIMT layer)
// and epcomm._C_cuda (EPCOMM_WITH_CUDA_RUNTIME: the cuda runtime).
//
// Only pybind11 (shipped with torch) is included: torch/extension.h would add ~20 s of compile time
// per module and nothing here needs tensors; Python passes tensors to kernels as data_ptr() ints,
// in typed Params structs set field by field (kernel_types.hpp).
// Errors become epcomm's own exceptions (epcomm.errors): kTimeout -> EpcommTimeoutError,
// kNoDevice -> EpcommBackendUnavailable, kInvalidArgument -> ValueError, others -> EpcommError.
// Calls that can wait on peers release the GIL.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

#include "../runtime/device_runtime.hpp"
#if defined(EPCOMM_WITH_CUDA_RUNTIME)
#include "../runtime/gin_network.hpp"
#endif
#include "../runtime/internode_entries.hpp"
#include "../runtime/low_latency_entries.hpp"
#include "../runtime/intranode_entries.hpp"
#include "kernel_types.hpp"

#ifndef TORCH_EXTENSION_NAME
#error "build through setup.py (torch.utils.cpp_extension sets TORCH_EXTENSION_NAME)"
#endif

namespace py = pybind11;
using namespace epcomm::runtime;
namespace kernels = epcomm::kernels;

namespace {

#if defined(EPCOMM_WITH_CPU_RUNTIME)
constexpr char const* kKind = "cpu";
std::unique_ptr<DeviceRuntime> make_runtime(RuntimeOptions const& options) { return make_cpu_runtime(options); }
#elif defined(EPCOMM_WITH_CUDA_RUNTIME)
constexpr char const* kKind = "cuda";
std::unique_ptr<DeviceRuntime> make_runtime(RuntimeOptions const& options) { return make_cuda_runtime(options); }
#else
#error "define EPCOMM_WITH_CPU_RUNTIME or EPCOMM_WITH_CUDA_RUNTIME"
#endif

void raise_epcomm_error(RuntimeError const& error) {
  char const* type_name = "EpcommError";
  switch (error.code()) {
    case ErrorCode::kTimeout: type_name = "EpcommTimeoutError"; break;
    case ErrorCode::kCallRejected: type_name = "EpcommCallRejected"; break;
    case ErrorCode::kRecvOverflow: type_name = "EpcommRecvOverflow"; break;
    case ErrorCode::kNoDevice: type_name = "EpcommBackendUnavailable"; break;
    case ErrorCode::kInvalidArgument: PyErr_SetString(PyExc_ValueError, error.what()); return;
    default: break;
  }
  py::object type = py::module_::import("epcomm.errors").attr(type_name);
  PyErr_SetString(type.ptr(), error.what());
}

IpcHandle handle_from_bytes(py::bytes const& data) {
  std::string const text = data;
  if (text.size() != kHandleBytes)
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       "a handle is " + std::to_string(kHandleBytes) + " bytes, got " + std::to_string(text.size()));
  IpcHandle handle{};
  std::memcpy(handle.data(), text.data(), kHandleBytes);
  return handle;
}

// A runtime with its default stream, as Python sees it.
class PyRuntime {
 public:
  PyRuntime(int rank, int num_ranks, std::string run_token, int device, int num_nvl_ranks)
      : runtime_(make_runtime(RuntimeOptions{rank, num_ranks, std::move(run_token), device, num_nvl_ranks})) {}

  DeviceRuntime& get() {
    if (!runtime_) throw RuntimeError(ErrorCode::kInvalidArgument, "this runtime was closed");
    return *runtime_;
  }
  // Each teardown step first waits for the kernels still enqueued (DeviceRuntime::drain_pending): none may
  // use the buffers, the peers' mappings or the network past it.
  ~PyRuntime() {
    if (runtime_) runtime_->drain_pending();
  }
  void close() {
    if (runtime_) {
      runtime_->drain_pending();
      runtime_->close();
    }
  }
  void close_peers() {
    if (runtime_) {
      runtime_->drain_pending();
      runtime_->close_peers();
    }
  }
  void abandon() {
    if (runtime_) {
      runtime_->drain_pending();
      runtime_->abandon();
    }
  }
  template <class Params>
  void run(typename Params::Spec const& spec, Params const& params, double timeout_s,
           std::optional<uintptr_t> stream, bool enqueue_only) {
    get().run(stream_for(stream), spec, params, timeout_s, enqueue_only);
  }

  // `native` None: the runtime's own stream; otherwise a stream it borrows (cuda: a cudaStream_t such as
  // torch.cuda.current_stream().cuda_stream, 0 being the legacy default stream), wrapped once and kept
  // while the runtime lives.
  Stream& stream_for(std::optional<uintptr_t> native) {
    DeviceRuntime& runtime = get();
    if (!native) return runtime.default_stream();
    std::lock_guard<std::mutex> const lock(streams_mutex_);
    std::unique_ptr<Stream>& stream = borrowed_[*native];
    if (!stream) stream = runtime.borrow_stream(reinterpret_cast<void*>(*native));
    return *stream;
  }

 private:
  std::unique_ptr<DeviceRuntime> runtime_;
  std::mutex streams_mutex_;
  std::unordered_map<uintptr_t, std::unique_ptr<Stream>> borrowed_;
};

// runtime.run(spec, params, timeout_s, stream=0, enqueue_only=False) for every kernel's Params type.
template <class... Params>
void bind_run(py::class_<PyRuntime>& runtime) {
  using Release = py::call_guard<py::gil_scoped_release>;
  (runtime.def("run", &PyRuntime::run<Params>, py::arg("spec"), py::arg("params"), py::arg("timeout_s"),
               py::arg("stream") = py::none(), py::arg("enqueue_only") = false, Release(),
               "Run the kernel of `params` (its type picks it) with `spec` on `stream` (None: the runtime's own). "
               "Waits for it to finish, or with enqueue_only returns once it is issued (check_pending reports it)."),
   ...);
}

#if defined(EPCOMM_WITH_CPU_RUNTIME)
// Two processes ping-pong `rounds` messages through shared mappings: a 64-byte payload written with
// plain stores, then a flag published with a release store; the receiver acquire-polls the flag
// and checks the payload. Returns the number of payload mismatches (0 on a correct memory model).
// `send_area` is in the peer's buffer, `recv_area` in ours; both are [flag u64 | payload 8 x u64].
// `timeout_s` bounds each round (not the whole run), and a long wait yields the CPU now and then: on a loaded
// machine with fewer cores than spinning processes, a round may need the peer to be scheduled first.
int64_t shm_handshake(uintptr_t send_area, uintptr_t recv_area, int64_t rounds, bool initiator, double timeout_s) {
  auto* send = reinterpret_cast<uint64_t*>(send_area);
  auto* recv = reinterpret_cast<uint64_t*>(recv_area);
  int64_t mismatches = 0;
  auto send_message = [&](uint64_t round) {
    for (int i = 0; i < 8; ++i) send[1 + i] = round * 1000003u + uint64_t(i) * 7919u + (initiator ? 1u : 2u);
    std::atomic_ref<uint64_t>(send[0]).store(round, std::memory_order_release);
  };
  auto receive_message = [&](uint64_t round) {
    auto const deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    for (uint64_t spins = 1; std::atomic_ref<uint64_t>(recv[0]).load(std::memory_order_acquire) < round; ++spins) {
      if (spins % 1024 == 0) std::this_thread::yield();
      if (std::chrono::steady_clock::now() > deadline)
        throw RuntimeError(ErrorCode::kTimeout, "shm_handshake: the peer did not answer round " + std::to_string(round));
    }
    for (int i = 0; i < 8; ++i)
      mismatches += recv[1 + i] != round * 1000003u + uint64_t(i) * 7919u + (initiator ? 2u : 1u);
  };
  for (uint64_t round = 1; round <= uint64_t(rounds); ++round) {
    if (initiator) {
      send_message(round);
      receive_message(round);
    } else {
      receive_message(round);
      send_message(round);
    }
  }
  return mismatches;
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "epcomm device runtime (see csrc/runtime/device_runtime.hpp)";
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (RuntimeError const& error) {
      raise_epcomm_error(error);
    }
  });
  m.attr("KIND") = kKind;
  m.attr("HANDLE_BYTES") = kHandleBytes;
  m.attr("CONTROL_BYTES") = kControlBytes;
  m.attr("MAX_RANKS") = kMaxRanks;
  using Release = py::call_guard<py::gil_scoped_release>;

  py::class_<PyRuntime> runtime(m, "DeviceRuntime",
                                 "One rank's device runtime: its peer-visible buffer, the peers' mappings, kernels.");
  runtime.def(py::init<int, int, std::string, int, int>(), py::arg("rank"), py::arg("num_ranks"), py::arg("run_token"),
           py::arg("device") = -1, py::arg("num_nvl_ranks") = 0)
      .def_property_readonly("kind", [](PyRuntime& self) { return std::string(self.get().kind()); })
      .def_property_readonly("rank", [](PyRuntime& self) { return self.get().rank(); })
      .def_property_readonly("num_ranks", [](PyRuntime& self) { return self.get().num_ranks(); })
      .def_property_readonly("num_bytes", [](PyRuntime& self) { return self.get().num_bytes(); })
      .def("allocate", [](PyRuntime& self, size_t num_bytes) { self.get().allocate(num_bytes); }, py::arg("num_bytes"),
           "Allocate this rank's buffer: num_bytes of data after a control region, zeroed.")
      .def("export_handle",
           [](PyRuntime& self) {
             IpcHandle const handle = self.get().export_handle();
             return py::bytes(reinterpret_cast<char const*>(handle.data()), handle.size());
           })
      .def("open_peers",
           [](PyRuntime& self, std::vector<py::bytes> const& handles) {
             std::vector<IpcHandle> parsed;
             for (py::bytes const& handle : handles) parsed.push_back(handle_from_bytes(handle));
             py::gil_scoped_release release;
             self.get().open_peers(parsed);
           },
           py::arg("handles"))
      .def("release_names", [](PyRuntime& self) { self.get().release_names(); })
      .def("open_network",
           [](PyRuntime& self, py::bytes const& network_id, size_t rdma_bytes, int num_signals, double timeout_s) {
             IpcHandle const id = handle_from_bytes(network_id);
             py::gil_scoped_release release;
             self.get().open_network(id, rdma_bytes, num_signals, timeout_s);
           },
           py::arg("network_id"), py::arg("rdma_bytes"), py::arg("num_signals"), py::arg("timeout_s"),
           "Collective across every node: the network between nodes (cuda: NCCL GIN) from rank 0's "
           "create_network_id(); an RDMA window of rdma_bytes and num_signals signals. kNoDevice where there is none.")
      .def_property_readonly("network_rdma_bytes",
                             [](PyRuntime& self) -> size_t {
#if defined(EPCOMM_WITH_CUDA_RUNTIME)
                               if (GinNetwork* network = self.get().network()) return network->rdma_bytes();
#endif
                               return 0;
                             })
      .def_property_readonly("network_signals",
                             [](PyRuntime& self) -> int {
#if defined(EPCOMM_WITH_CUDA_RUNTIME)
                               if (GinNetwork* network = self.get().network()) return network->num_signals();
#endif
                               return 0;
                             })
      .def_property_readonly("network_local_ptr",
                             [](PyRuntime& self) -> uintptr_t {
#if defined(EPCOMM_WITH_CUDA_RUNTIME)
                               if (GinNetwork* network = self.get().network())
                                 return reinterpret_cast<uintptr_t>(network->local_buffer());
#endif
                               return 0;
                             },
                             "This rank's RDMA window (device memory; 0 without a network).")
      .def("zero_network",
           [](PyRuntime& self, std::optional<uintptr_t> stream) { self.get().zero_network(self.stream_for(stream)); },
           py::arg("stream") = py::none(),
           "Zero this rank's RDMA window (a re-layout), in stream order; nothing without a network.")
      .def("close", &PyRuntime::close,
           "Unmap and free everything; idempotent. Only after every peer's close_peers() (a host barrier between).")
      .def("close_peers", &PyRuntime::close_peers,
           "Unmap every peer's buffer; this rank's own stays (the first step of a collective teardown).")
      .def("abandon", &PyRuntime::abandon,
           "Teardown without the peers: never frees memory a peer may still map (see device_runtime.hpp).")
      .def_property_readonly("peer_ptrs",
                             [](PyRuntime& self) {
                               std::vector<uintptr_t> pointers;
                               for (int r = 0; r < self.get().num_ranks(); ++r)
                                 pointers.push_back(reinterpret_cast<uintptr_t>(self.get().peer_data(r)));
                               return pointers;
                             })
      .def_property_readonly("local_ptr", [](PyRuntime& self) { return reinterpret_cast<uintptr_t>(self.get().local_data()); })
      .def_property_readonly("peer_table_ptr",
                             [](PyRuntime& self) { return reinterpret_cast<uintptr_t>(self.get().device_peer_data_table()); })
      .def("zero",
           [](PyRuntime& self, size_t offset, int64_t num_bytes, std::optional<uintptr_t> stream) {
             DeviceRuntime& runtime = self.get();
             size_t const count = num_bytes < 0 ? runtime.num_bytes() - std::min(offset, runtime.num_bytes()) : size_t(num_bytes);
             runtime.zero(self.stream_for(stream), offset, count);
           },
           py::arg("offset") = 0, py::arg("num_bytes") = -1, py::arg("stream") = py::none())
      .def("synchronize",
           [](PyRuntime& self, std::optional<uintptr_t> stream) { self.stream_for(stream).synchronize(); },
           py::arg("stream") = py::none(), Release())
      .def("barrier",
           [](PyRuntime& self, double timeout_s, std::optional<uintptr_t> stream) {
             self.get().barrier(self.stream_for(stream), timeout_s);
           },
           py::arg("timeout_s"), py::arg("stream") = py::none(), Release())
      .def("check_pending", [](PyRuntime& self, bool wait) { self.get().check_pending(wait); }, py::arg("wait"), Release(),
           "Report the kernels run with enqueue_only, oldest first: drop those finished (raising the first error), "
           "give up on those past their host deadline. wait: block until each finished or passed its deadline.")
      .def_property_readonly("num_pending", [](PyRuntime& self) { return self.get().num_pending(); })
      .def_property_readonly("clock_ticks_per_second", [](PyRuntime& self) { return self.get().clock_ticks_per_second(); });
  bind_run<kernels::NotifyParams, kernels::IntranodeDispatchParams, kernels::IntranodeCombineParams,
           kernels::InternodeNotifyParams, kernels::InternodeDispatchParams, kernels::InternodeCombineParams,
           kernels::LowLatencyDispatchSendParams, kernels::LowLatencyDispatchRecvParams,
           kernels::LowLatencyCombineSendParams, kernels::LowLatencyCombineRecvParams,
           kernels::LowLatencyResetSignalsParams>(runtime);

  m.def("registered_kernels", [] { return registered_kernels(kKind); });

  epcomm::bindings::bind_kernel_types(m);
  m.def("workspace_bytes", py::overload_cast<kernels::IntranodeSpec const&>(&entries::workspace_bytes), py::arg("spec"),
        "(NVL region bytes, RDMA region bytes = 0) each rank's buffer needs for the intranode kernels.");
  m.def("workspace_bytes", py::overload_cast<kernels::InternodeSpec const&>(&entries::workspace_bytes), py::arg("spec"),
        "(NVL region bytes, RDMA region bytes) each rank's buffer needs for the internode kernels.");
  m.def(
      "epoch_counter_offset",
      [](kernels::IntranodeSpec const& spec) { return entries::nvl_workspace(spec).epoch_counter_offset; },
      py::arg("spec"), "Byte offset in each rank's buffer of its notifies' epoch counter (kernels/epoch.cuh).");
  m.def(
      "epoch_counter_offset",
      [](kernels::InternodeSpec const& spec) { return entries::nvl_workspace(spec).epoch_counter_offset; },
      py::arg("spec"), "Byte offset in each rank's buffer of its notifies' epoch counter (kernels/epoch.cuh).");
  m.def("internode_put_metadata",
        [](kernels::InternodeSpec const& spec) {
          kernels::RdmaWorkspace const rdma(spec.workspace, spec.config);
          return py::dict(py::arg("record_bytes") = rdma.record_bytes,
                          py::arg("combine_partial_offset") = rdma.combine_partial_offset());
        },
        py::arg("spec"),
        "What a network put carries besides the row (rdma_workspace.cuh): a dispatch row's source record "
        "bytes, and where a combine slot's partial starts (after the fp32 weights, on 16 bytes).");
  m.def("low_latency_workspace_bytes", &entries::low_latency_workspace_bytes, py::arg("spec"), py::arg("num_ranks"),
        "Byte each rank's buffer must reach for the low-latency kernels of `spec` (region_offset + both slots).");
  m.def("low_latency_layout",
        [](kernels::LowLatencySpec const& spec, int num_ranks, int slot) {
          kernels::LowLatencyLayout const layout = kernels::low_latency_layout(spec, num_ranks);
          return py::dict(py::arg("combine_send_buffer") = layout.combine_send_buffer(slot),
                          py::arg("dispatch_generation") = layout.generation(slot, false),
                          py::arg("combine_generation") = layout.generation(slot, true),
                          py::arg("counters_end") = size_t(spec.region_offset) + layout.counters_end(),
                          py::arg("total_bytes") = size_t(spec.region_offset) + layout.required_bytes());
        },
        py::arg("spec"), py::arg("num_ranks"), py::arg("slot"),
        "Absolute byte offsets of the LL layout Python needs: the slot's zero-copy combine buffer, its uint64 "
        "dispatch/combine generations, the end of the signals and generations (zeroing [region_offset, "
        "counters_end) is a clean), the region's end.");
  m.def("spec_problem", py::overload_cast<kernels::IntranodeSpec const&>(&entries::spec_problem), py::arg("spec"),
        "'' when the intranode kernels take this spec, else the rule it breaks.");
  m.def("spec_problem", py::overload_cast<kernels::InternodeSpec const&>(&entries::spec_problem), py::arg("spec"),
        "'' when the internode kernels take this spec, else the rule it breaks.");

  m.def("transport_signals",
        [](kernels::InternodeSpec const& spec) {
          return kernels::RdmaWorkspace(spec.workspace, spec.config).num_signals();
        },
        py::arg("spec"), "Transport signals the internode kernels of `spec` use (a GIN session needs as many).");

#if defined(EPCOMM_WITH_CUDA_RUNTIME)
  m.attr("GIN_BUILT") = gin_network_built();
  m.def("create_network_id",
        [] {
          NetworkId const id = create_network_id();
          return py::bytes(reinterpret_cast<char const*>(id.data()), id.size());
        },
        "An NCCL unique id (rank 0 makes it; the process group carries it to every rank's open_network).");
#endif

#if defined(EPCOMM_WITH_CPU_RUNTIME)
  m.def("segment_name", &cpu_segment_name, py::arg("run_token"), py::arg("rank"));
  m.def("unlink_segments", &cpu_unlink_segments, py::arg("run_token"), py::arg("num_ranks"),
        "shm_unlink every rank's segment of a run (failure cleanup); returns how many existed.");
  py::module_ testing = m.def_submodule("testing", "hooks for tests/test_runtime.py");
  testing.def("shm_handshake", &shm_handshake, py::arg("send_area"), py::arg("recv_area"), py::arg("rounds"),
              py::arg("initiator"), py::arg("timeout_s"), Release());
#endif
}
