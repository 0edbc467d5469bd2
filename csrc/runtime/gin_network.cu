// GinNetwork (gin_network.hpp): the cuda runtime's own NCCL communicator and its GIN session.
// Host code only (nvcc because gin_setup's GinTransport header is CUDA-only); no torch headers.
//
// NCCL calls, in order: ncclGetVersion (>= 2.30: the device API with GIN), ncclCommInitRankConfig
// (non-blocking, polled against the deadline), GinSession (gin_setup.cu); teardown: GinSession::close,
// ncclCommFinalize (polled), ncclCommDestroy; on any failure or deadline: ncclCommAbort.

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>

#include "../transport/gin_transport.cuh"
#include "gin_network.hpp"
#include "gin_setup.hpp"

namespace epcomm::runtime {

namespace {

// NCCL_VERSION_CODE of 2.30.0: the first release with the GIN device API gin_transport.cuh is written against.
constexpr int kMinNcclVersion = 23000;

[[noreturn]] void fail(ErrorCode code, std::string const& message) {
  throw RuntimeError(code, "NCCL network across nodes: " + message);
}

// The NCCL library this process loaded (not the headers it was built with) must have GIN.
void check_nccl_version() {
  int version = 0;
  if (ncclGetVersion(&version) != ncclSuccess)
    fail(ErrorCode::kNoDevice, "ncclGetVersion failed: is libnccl.so.2 usable?");
  if (version < kMinNcclVersion)
    fail(ErrorCode::kNoDevice, "the loaded NCCL is " + std::to_string(version / 10000) + "." +
                                   std::to_string(version / 100 % 100) + "." + std::to_string(version % 100) +
                                   "; GIN needs NCCL >= 2.30 (torch's nvidia-nccl wheel, or LD_LIBRARY_PATH to one)");
}

// Waits until `call` on the non-blocking communicator settled (settle_nccl); throws kTimeout past `deadline`,
// `on_failure` when NCCL reports an error.
void wait_settled(ncclComm_t comm, ncclResult_t result, char const* call, HostClock::time_point deadline,
                  ErrorCode on_failure) {
  result = settle_nccl(comm, result, deadline);
  if (result == ncclInProgress)
    fail(ErrorCode::kTimeout, std::string(call) + " did not complete in time: some rank did not take part "
                                                  "(dead, late, or failed before it)");
  if (result != ncclSuccess)
    fail(on_failure, nccl_problem(comm, call, result) + " (NCCL_DEBUG=INFO says why)");
}

}  // namespace

bool gin_network_built() { return true; }

NetworkId create_network_id() {
  check_nccl_version();
  ncclUniqueId id;
  static_assert(sizeof(ncclUniqueId) == sizeof(NetworkId), "an ncclUniqueId travels as a NetworkId");
  if (ncclResult_t const result = ncclGetUniqueId(&id); result != ncclSuccess)
    fail(ErrorCode::kNoDevice, std::string("ncclGetUniqueId failed with ") + ncclGetErrorString(result) +
                                   " (no network interface NCCL's bootstrap can use? NCCL_SOCKET_IFNAME selects one)");
  NetworkId bytes{};
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

struct GinNetwork::State {
  ncclComm_t comm = nullptr;
  std::unique_ptr<GinSession> session;
  bool closed = false, aborted = false;
};

GinNetwork::GinNetwork(NetworkId const& id, int rank, int num_ranks, size_t rdma_bytes, int num_signals,
                       double timeout_s)
    : state_(std::make_unique<State>()) {
  if (!(timeout_s > 0)) fail(ErrorCode::kInvalidArgument, "timeout_s must be > 0");
  check_nccl_version();
  State& s = *state_;
  ncclUniqueId unique_id;
  std::memcpy(&unique_id, id.data(), sizeof(unique_id));
  // Non-blocking: every collective call returns at once and is polled against the deadline, so a
  // peer that failed before it (and will never call) cannot hold this rank inside NCCL.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  HostClock::time_point const deadline = deadline_after(timeout_s);
  try {
    ncclResult_t const result = ncclCommInitRankConfig(&s.comm, num_ranks, unique_id, rank, &config);
    if (s.comm == nullptr)
      fail(ErrorCode::kNoDevice, std::string("ncclCommInitRankConfig failed with ") + ncclGetErrorString(result));
    // Creating the communicator is where a missing network (no IB/RoCE device NCCL can use) shows: this
    // machine cannot run the backend across nodes, so kNoDevice (EpcommBackendUnavailable).
    wait_settled(s.comm, result, "ncclCommInitRankConfig", deadline, ErrorCode::kNoDevice);
    s.session = std::make_unique<GinSession>(s.comm, rdma_bytes, num_signals, timeout_s);
  } catch (...) {
    abort();  // peers waiting in a collective call see it fail instead of waiting for their deadline
    throw;
  }
}

GinNetwork::~GinNetwork() { abort(); }

transport::GinTransport const& GinNetwork::transport() const {
  if (!usable()) fail(ErrorCode::kInvalidArgument, "the network was closed or aborted");
  return state_->session->transport();
}

char* GinNetwork::local_buffer() const { return transport().buffer; }

size_t GinNetwork::rdma_bytes() const { return state_->session ? state_->session->buffer_bytes() : 0; }

int GinNetwork::num_signals() const { return state_->session ? state_->session->num_signals() : 0; }

bool GinNetwork::usable() const { return state_->session != nullptr && !state_->closed && !state_->aborted; }

void GinNetwork::close(double timeout_s) {
  State& s = *state_;
  if (s.closed || s.aborted || s.comm == nullptr) return;
  try {
    if (s.session) s.session->close();  // collective: window, device communicator (deadline: the session's)
    HostClock::time_point const deadline = deadline_after(timeout_s > 0 ? timeout_s : 60.0);
    wait_settled(s.comm, ncclCommFinalize(s.comm), "ncclCommFinalize", deadline, ErrorCode::kSystem);
  } catch (...) {
    abort();
    throw;
  }
  ncclCommDestroy(s.comm);  // local once finalized
  s.comm = nullptr;
  s.session.reset();
  s.closed = true;
}

void GinNetwork::abort() noexcept {
  State& s = *state_;
  if (s.closed || s.aborted) return;
  s.aborted = true;
  if (s.session) s.session->abandon();  // an aborted communicator takes no more calls
  if (s.comm != nullptr) ncclCommAbort(s.comm);
  s.comm = nullptr;
}

}  // namespace epcomm::runtime
