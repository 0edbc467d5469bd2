// GinSession (gin_setup.hpp): NCCL communicator -> symmetric RDMA window + GIN device
// communicator -> GinTransport, and the teardown. Host code only (nvcc because it fills a
// GinTransport, whose header is CUDA-only); no torch headers.
//
// NCCL calls, in order: ncclCommQueryProperties (device API? which ginType?), ncclMemAlloc (the
// RDMA buffer), ncclCommWindowRegister (NCCL_WIN_COLL_SYMMETRIC: same offset, same place on every
// rank), ncclDevCommCreate (GIN signals and one context, full connectivity), then the reverse:
// ncclDevCommDestroy, ncclCommWindowDeregister, ncclMemFree. Register and create are collective,
// and so are taken destroy and deregister to be: every rank makes them, in the same order.

#include <cuda_runtime.h>

#include <climits>
#include <string>

#include "../transport/gin_transport.cuh"
#include "device_runtime.hpp"
#include "gin_setup.hpp"

namespace epcomm::runtime {

namespace {

constexpr char kOtherTransports[] = "use the shm transport or backend='torch'";

char const* gin_type_name(int type) {
  switch (type) {
    case NCCL_GIN_TYPE_NONE: return "none";
    case NCCL_GIN_TYPE_PROXY: return "proxy";
    case NCCL_GIN_TYPE_GDAKI: return "GDAKI";
    case NCCL_GIN_TYPE_GPI: return "GPI";
    default: return "unknown";
  }
}

[[noreturn]] void fail(ErrorCode code, std::string const& message) {
  throw RuntimeError(code, "GIN transport: " + message);
}

// When a collective call must have settled by; HostClock::time_point::max(): no limit (timeout_s <= 0).
HostClock::time_point settle_deadline(double timeout_s) {
  return timeout_s > 0 ? deadline_after(timeout_s) : HostClock::time_point::max();
}

// Throws for a failed NCCL call: the call, NCCL's words for it, and what to do; kTimeout when it
// did not settle by `deadline` (a peer that never made the matching call).
void check_nccl(ncclComm_t comm, ncclResult_t result, char const* call, std::string const& advice,
                HostClock::time_point deadline = HostClock::time_point::max()) {
  result = settle_nccl(comm, result, deadline);
  if (result == ncclInProgress)
    fail(ErrorCode::kTimeout, std::string(call) + " did not complete in time: some rank did not make the same "
                                                  "collective call (dead, late, or failed earlier)");
  if (result == ncclSuccess) return;
  fail(ErrorCode::kSystem, nccl_problem(comm, call, result) + "; " + advice);
}

void check_cuda(cudaError_t error, char const* call) {
  if (error == cudaSuccess) return;
  bool const no_device = error == cudaErrorInsufficientDriver || error == cudaErrorNoDevice;
  fail(no_device ? ErrorCode::kNoDevice : ErrorCode::kSystem,
       std::string(call) + " failed with " + cudaGetErrorName(error) + ": " + cudaGetErrorString(error) +
           (no_device ? std::string("; no usable GPU: ") + kOtherTransports : std::string()));
}

size_t round_up(size_t bytes, size_t alignment) { return (bytes + alignment - 1) / alignment * alignment; }

// Device API and a GIN backend, on the device this thread has current.
ncclCommProperties_t query_properties(ncclComm_t comm) {
  ncclCommProperties_t properties = NCCL_COMM_PROPERTIES_INITIALIZER;
  check_nccl(comm, ncclCommQueryProperties(comm, &properties), "ncclCommQueryProperties",
             "is `comm` a live NCCL communicator?");
  if (!properties.deviceApiSupport)
    fail(ErrorCode::kNoDevice, std::string("this NCCL communicator has no device API support "
                                           "(ncclCommQueryProperties: deviceApiSupport=false): ") + kOtherTransports);
  if (properties.ginType == NCCL_GIN_TYPE_NONE)
    fail(ErrorCode::kNoDevice, std::string("this NCCL has no GIN support (ginType=none): ") + kOtherTransports);
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device != properties.cudaDev)
    fail(ErrorCode::kInvalidArgument, "the communicator belongs to CUDA device " + std::to_string(properties.cudaDev) +
                                          " but device " + std::to_string(device) +
                                          " is current: cudaSetDevice to it first");
  return properties;
}

// What the GinTransport needs of a device communicator: indexed signals starting at 0
// (core.h: ginSignalCount "Guaranteed to start at id=0"), strong signals, one context shared by
// every warp (strong signals order only the puts of one context), a connection to every rank.
ncclDevCommRequirements_t requirements(int num_signals) {
  ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
  reqs.ginSignalCount = num_signals;
  reqs.ginContextCount = 1;  // a hint (core.h); checked after creation
  reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;
  reqs.ginStrongSignalsRequired = true;
  reqs.ginVaSignalsRequired = false;
  return reqs;
}

// gin_transport.cuh compiles only the proxy and GDAKI backends: any other connection would hit
// __builtin_unreachable in NCCL's backend switch.
void check_backends(ncclDevComm const& dev_comm, int num_signals) {
  if (dev_comm.ginConnectionCount == 0 || dev_comm.ginContextCount < 1)
    fail(ErrorCode::kNoDevice, std::string("ncclDevCommCreate gave no GIN connection or context: ") + kOtherTransports);
  if (dev_comm.ginConnectionsRailed)
    fail(ErrorCode::kNoDevice, std::string("ncclDevCommCreate gave rail-only GIN connections, but the transport puts "
                                           "to every rank: ") + kOtherTransports);
  if (dev_comm.ginSignalCount < num_signals)
    fail(ErrorCode::kSystem, "ncclDevCommCreate gave " + std::to_string(dev_comm.ginSignalCount) + " GIN signals, " +
                                 std::to_string(num_signals) + " asked for");
  for (int connection = 0; connection < dev_comm.ginConnectionCount; ++connection) {
    int const type = dev_comm.ginNetDeviceTypes[connection];
    if (type != NCCL_NET_DEVICE_GIN_PROXY && type != NCCL_NET_DEVICE_GIN_GDAKI)
      fail(ErrorCode::kNoDevice, std::string("GIN connection ") + std::to_string(connection) + " uses the " +
                                     gin_type_name(type) + " backend, which GinTransport does not compile in: set "
                                     "NCCL_GIN_TYPE=3 (GDAKI) or 2 (proxy), or " + kOtherTransports);
  }
}

}  // namespace

ncclResult_t settle_nccl(ncclComm_t comm, ncclResult_t result, HostClock::time_point deadline) {
  poll_until(
      [&] {
        if (result != ncclInProgress) return true;
        if (ncclResult_t const query = ncclCommGetAsyncError(comm, &result); query != ncclSuccess) result = query;
        return result != ncclInProgress;
      },
      deadline);
  return result;
}

std::string nccl_problem(ncclComm_t comm, char const* call, ncclResult_t result) {
  std::string message = std::string(call) + " failed with " + ncclGetErrorString(result) + " (ncclResult_t " +
                        std::to_string(int(result)) + ")";
  char const* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') message += ": " + std::string(last);
  return message;
}

struct GinSession::State {
  ncclComm_t comm = nullptr;
  double timeout_s = 0;                      // per collective call (0: no limit)
  int num_signals = 0;
  int gin_type = NCCL_GIN_TYPE_NONE;
  size_t buffer_bytes = 0;
  void* buffer = nullptr;                    // ncclMemAlloc
  ncclWindow_t window = nullptr;             // ncclCommWindowRegister
  bool has_dev_comm = false;
  ncclDevComm dev_comm{};                    // ncclDevCommCreate's host copy (ncclDevCommDestroy takes it)
  ncclDevComm* device_dev_comm = nullptr;    // its device copy, which GinTransport::dev_comm points to
  transport::GinTransport transport{};

  // Undoes what was set up, newest first, going on past failures; returns the first one ("" if none).
  std::string release() {
    std::string first;
    auto note = [&](bool failed, char const* call) {
      if (failed && first.empty()) first = std::string(call) + " failed";
    };
    if (device_dev_comm != nullptr) note(cudaFree(device_dev_comm) != cudaSuccess, "cudaFree");
    if (has_dev_comm)
      note(settle_nccl(comm, ncclDevCommDestroy(comm, &dev_comm), settle_deadline(timeout_s)) != ncclSuccess,
           "ncclDevCommDestroy");
    if (window != nullptr)
      note(settle_nccl(comm, ncclCommWindowDeregister(comm, window), settle_deadline(timeout_s)) != ncclSuccess,
           "ncclCommWindowDeregister");
    if (buffer != nullptr) note(ncclMemFree(buffer) != ncclSuccess, "ncclMemFree");
    device_dev_comm = nullptr, has_dev_comm = false, window = nullptr, buffer = nullptr;
    return first;
  }
  ~State() { release(); }
};

GinSession::GinSession(ncclComm_t comm, size_t buffer_bytes, int num_signals, double timeout_s)
    : state_(std::make_unique<State>()) {
  if (comm == nullptr || buffer_bytes == 0 || num_signals <= 0)
    fail(ErrorCode::kInvalidArgument, "GinSession needs a communicator, buffer_bytes > 0 and num_signals > 0 (got " +
                                          std::to_string(buffer_bytes) + ", " + std::to_string(num_signals) + ")");
  State& s = *state_;
  s.comm = comm;
  s.timeout_s = timeout_s;
  s.num_signals = num_signals;
  ncclCommProperties_t const properties = query_properties(comm);
  s.gin_type = properties.ginType;

  // The RDMA buffer: same size on every rank, zeroed before any peer can put into it.
  s.buffer_bytes = round_up(buffer_bytes, NCCL_WIN_REQUIRED_ALIGNMENT);
  check_nccl(comm, ncclMemAlloc(&s.buffer, s.buffer_bytes), "ncclMemAlloc",
             "out of GPU memory? " + std::to_string(s.buffer_bytes) + " bytes were asked for");
  check_cuda(cudaMemset(s.buffer, 0, s.buffer_bytes), "cudaMemset");
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  check_nccl(comm, ncclCommWindowRegister(comm, s.buffer, s.buffer_bytes, &s.window, NCCL_WIN_COLL_SYMMETRIC),
             "ncclCommWindowRegister", "every rank must register the same size at the same point",
             settle_deadline(timeout_s));

  ncclDevCommRequirements_t const reqs = requirements(num_signals);
  check_nccl(comm, ncclDevCommCreate(comm, &reqs, &s.dev_comm), "ncclDevCommCreate",
             "GIN could not be set up for " + std::to_string(num_signals) +
                 " signals, 1 context, every rank connected (NCCL_DEBUG=INFO says why; NCCL_GIN_TYPE=2 "
                 "selects the proxy backend); or " + kOtherTransports,
             settle_deadline(timeout_s));
  s.has_dev_comm = true;
  check_backends(s.dev_comm, num_signals);

  check_cuda(cudaMalloc(&s.device_dev_comm, sizeof(ncclDevComm)), "cudaMalloc");
  check_cuda(cudaMemcpy(s.device_dev_comm, &s.dev_comm, sizeof(ncclDevComm), cudaMemcpyHostToDevice), "cudaMemcpy");
  // a pageable copy may return before its DMA lands; the kernels' non-blocking streams do not wait for it
  check_cuda(cudaStreamSynchronize(nullptr), "cudaStreamSynchronize(legacy stream)");

  transport::GinTransport& t = s.transport;
  t.dev_comm = s.device_dev_comm;
  t.window = s.window;
  t.buffer = static_cast<char*>(s.buffer);
  t.my_rank = s.dev_comm.rank;
  t.world_size = s.dev_comm.nRanks;
  t.context_index = 0;
  t.signal_base = 0;
  t.num_signals = num_signals;
}

GinSession::~GinSession() = default;  // State::~State releases without throwing

transport::GinTransport const& GinSession::transport() const {
  if (state_->window == nullptr) fail(ErrorCode::kInvalidArgument, "transport() after close()");
  return state_->transport;
}

size_t GinSession::buffer_bytes() const { return state_->buffer_bytes; }

int GinSession::gin_type() const { return state_->gin_type; }

int GinSession::num_signals() const { return state_->num_signals; }

void GinSession::abandon() noexcept {
  State& s = *state_;
  s.device_dev_comm = nullptr, s.has_dev_comm = false, s.window = nullptr, s.buffer = nullptr;
}

void GinSession::close() {
  if (std::string const failure = state_->release(); !failure.empty())
    fail(ErrorCode::kSystem, "teardown: " + failure + " (synchronize every stream that used the transport first)");
}

}  // namespace epcomm::runtime
