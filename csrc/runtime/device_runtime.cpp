// The parts of DeviceRuntime shared by both implementations: argument checks, the barrier's
// error message, and the kernel registry. Declared in device_runtime.hpp.

#include "device_runtime.hpp"

#include <map>
#include <mutex>
#include <sstream>

namespace epcomm::runtime {

char const* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kNoDevice: return "no device";
    case ErrorCode::kSystem: return "system error";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kKernelFailed: return "kernel failed";
  }
  return "unknown";
}

DeviceRuntime::DeviceRuntime(RuntimeOptions options) : options_(std::move(options)) {
  if (options_.num_ranks < 1 || options_.num_ranks > kMaxRanks)
    throw RuntimeError(ErrorCode::kInvalidArgument, "num_ranks must be in [1, " + std::to_string(kMaxRanks) +
                                                        "], got " + std::to_string(options_.num_ranks));
  if (options_.rank < 0 || options_.rank >= options_.num_ranks)
    throw RuntimeError(ErrorCode::kInvalidArgument, "rank " + std::to_string(options_.rank) + " outside [0, " +
                                                        std::to_string(options_.num_ranks) + ")");
}

void* DeviceRuntime::peer_data(int rank) const {
  if (rank < 0 || rank >= num_ranks())
    throw RuntimeError(ErrorCode::kInvalidArgument,
                       "peer rank " + std::to_string(rank) + " outside [0, " + std::to_string(num_ranks()) + ")");
  check_state("peer_data", true, rank != this->rank());
  return peer_data_[size_t(rank)];
}

void DeviceRuntime::check_state(char const* call, bool need_allocated, bool need_peers) const {
  if (need_allocated && !allocated_)
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string(call) + ": call allocate() first (or the runtime was closed)");
  if (need_peers && !peers_open_)
    throw RuntimeError(ErrorCode::kInvalidArgument, std::string(call) + ": call open_peers() first");
}

void DeviceRuntime::barrier(Stream& stream, double timeout_s) {
  check_state("barrier", true, true);
  if (!(timeout_s > 0)) throw RuntimeError(ErrorCode::kInvalidArgument, "barrier: timeout_s must be > 0");
  uint64_t const epoch = ++barrier_epoch_;
  if (!launch_peer_barrier(stream, epoch, timeout_s)) return;

  // Name the missing peers from this rank's own flags (they may still arrive: say what was seen).
  std::vector<uint64_t> const flags = read_own_flags();
  std::ostringstream missing, arrived;
  int num_missing = 0;
  for (int peer = 0; peer < num_ranks(); ++peer) {
    if (flags[size_t(peer)] < epoch) {
      missing << (num_missing++ ? ", " : "") << "rank " << peer << " (at barrier " << flags[size_t(peer)] << ")";
    }
  }
  std::ostringstream message;
  message << "epcomm peer_barrier on rank " << rank() << ": ";
  if (num_missing)
    message << "peer " << missing.str() << " did not arrive at barrier " << epoch << " within " << timeout_s
            << " s (" << num_missing << " of " << num_ranks() << " ranks missing)";
  else
    message << "timed out after " << timeout_s << " s at barrier " << epoch
            << "; every peer arrived just after the limit";
  throw RuntimeError(ErrorCode::kTimeout, message.str());
}

/// Kernel registry

namespace {
std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<std::pair<std::string, std::string>, KernelEntry>& registry() {
  static std::map<std::pair<std::string, std::string>, KernelEntry> entries;
  return entries;
}
}  // namespace

void register_kernel(std::string const& kind, std::string const& name, KernelEntry entry) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[{kind, name}] = std::move(entry);
}

std::vector<std::string> registered_kernels(std::string const& kind) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<std::string> names;
  for (auto const& [key, entry] : registry())
    if (key.first == kind) names.push_back(key.second);
  return names;
}

void DeviceRuntime::run_kernel(std::string const& name, Stream& stream, std::vector<int64_t> const& args,
                               double timeout_s) {
  KernelEntry entry;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto found = registry().find({kind(), name});
    if (found != registry().end()) entry = found->second;
  }
  if (!entry) {
    std::string known;
    for (std::string const& n : registered_kernels(kind())) known += (known.empty() ? "" : ", ") + n;
    throw RuntimeError(ErrorCode::kInvalidArgument, "no kernel '" + name + "' for the " + kind() +
                                                        " runtime; registered: " + (known.empty() ? "none" : known));
  }
  entry(KernelCall{*this, stream, args, timeout_s});
}

namespace {
// The peer barrier is a kernel like any other for run_kernel("peer_barrier", ...): no arguments.
void run_peer_barrier(KernelCall const& call) {
  if (!call.args.empty())
    throw RuntimeError(ErrorCode::kInvalidArgument, "peer_barrier takes no arguments, got " +
                                                        std::to_string(call.args.size()));
  call.runtime.barrier(call.stream, call.timeout_s);
}
struct RegisterPeerBarrier {
  RegisterPeerBarrier() {
    register_kernel("cpu", "peer_barrier", run_peer_barrier);
    register_kernel("cuda", "peer_barrier", run_peer_barrier);
  }
} const register_peer_barrier;
}  // namespace

}  // namespace epcomm::runtime
