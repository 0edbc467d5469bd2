// The parts of DeviceRuntime shared by both implementations: argument checks, the barrier's
// error message, and the kernel registry. Declared in device_runtime.hpp.

#include "device_runtime.hpp"

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>

namespace epcomm::runtime {

char const* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "invalid argument";
    case ErrorCode::kNoDevice: return "no device";
    case ErrorCode::kSystem: return "system error";
    case ErrorCode::kTimeout: return "timeout";
    case ErrorCode::kKernelFailed: return "kernel failed";
    case ErrorCode::kCallRejected: return "call rejected";
    case ErrorCode::kRecvOverflow: return "receive overflow";
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

void DeviceRuntime::open_network(std::array<uint8_t, kHandleBytes> const&, size_t, int, double) {
  throw RuntimeError(ErrorCode::kNoDevice, std::string("the ") + kind() + " runtime has no network between nodes "
                                           "(its transport reaches every rank's mapped buffer)");
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

void DeviceRuntime::drain_pending() noexcept {
  try {
    check_pending(true);
  } catch (...) {  // teardown: nobody is left to tell
  }
}

void DeviceRuntime::check_pending(bool wait) {
  std::lock_guard<std::mutex> const lock(pending_mutex_);
  report_captured();
  std::optional<RuntimeError> first;
  auto keep = [&](std::exception_ptr error) {
    try {
      std::rethrow_exception(error);
    } catch (RuntimeError const& e) {
      if (!first) first = e;
    } catch (std::exception const& e) {
      if (!first) first = RuntimeError(ErrorCode::kSystem, e.what());
    }
  };
  for (auto it = pending_.begin(); it != pending_.end();) {
    PendingKernel& kernel = **it;
    try {
      bool const done =
          kernel.finished() || (wait && poll_until([&kernel] { return kernel.finished(); }, kernel.deadline()));
      if (!done && HostClock::now() < kernel.deadline()) {
        ++it;  // still running, within its time
        continue;
      }
      if (done)
        kernel.report();
      else
        kernel.give_up();
    } catch (...) {
      keep(std::current_exception());
    }
    it = pending_.erase(it);
  }
  if (first) throw *first;
}

void DeviceRuntime::barrier(Stream& stream, double timeout_s) {
  check_state("barrier", true, true);
  check_pending(false);
  if (!(timeout_s > 0)) throw RuntimeError(ErrorCode::kInvalidArgument, "barrier: timeout_s must be > 0");
  uint64_t const epoch = ++barrier_epoch_;
  bool const timed_out = launch_peer_barrier(stream, epoch, timeout_s);
  check_pending(false);  // the stream passed the barrier: what was enqueued before it has ended
  if (!timed_out) return;

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
struct RegisteredEntry {
  std::string name;
  std::shared_ptr<void const> entry;  // a KernelEntry<Params> const
};
std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<std::pair<std::string, std::type_index>, RegisteredEntry>& registry() {
  static std::map<std::pair<std::string, std::type_index>, RegisteredEntry> entries;
  return entries;
}
}  // namespace

namespace detail {
void register_entry(std::string const& kind, std::type_index params, char const* name, std::shared_ptr<void const> entry) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().insert_or_assign({kind, params}, RegisteredEntry{name, std::move(entry)});
}

std::shared_ptr<void const> find_entry(std::string const& kind, std::type_index params, char const* name) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto found = registry().find({kind, params});
    if (found != registry().end()) return found->second.entry;
  }
  std::string known;
  for (std::string const& n : registered_kernels(kind)) known += (known.empty() ? "" : ", ") + n;
  throw RuntimeError(ErrorCode::kInvalidArgument, std::string("no kernel '") + name + "' for the " + kind +
                                                      " runtime; registered: " + (known.empty() ? "none" : known));
}
}  // namespace detail

std::vector<std::string> registered_kernels(std::string const& kind) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<std::string> names;
  for (auto const& [key, entry] : registry())
    if (key.first == kind) names.push_back(entry.name);
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace epcomm::runtime
