// The cpu DeviceRuntime (device_runtime.hpp): POSIX shared memory as peer memory, one process per
// rank, kernels through the SIMT layer.
//
// Rank r's buffer is the segment "/epcomm-<run token>-<r>": shm_open(O_CREAT | O_EXCL) + ftruncate
// (zero-filled) + mmap(MAP_SHARED). Peers shm_open it by name and map it too. Once every rank has
// mapped every peer, release_names() shm_unlinks it: the memory lives on while mapped and the
// kernel frees it when the last process unmaps or dies, so a SIGKILL leaves nothing in /dev/shm.
// Until then, cpu_unlink_segments(token, num_ranks) lets any rank remove every rank's segment.
//
// Atomics on these mappings are the ordinary lock-free CPU atomics (x86: the same cache line in
// every process), which is what the SIMT layer's ptx helpers use.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>

#include "cpu_launch.hpp"
#include "device_runtime.hpp"
#include "peer_barrier.cuh"

namespace epcomm::runtime {

namespace {

constexpr uint32_t kCpuHandleMagic = 0x4d534345;  // "ECSM"
constexpr uint32_t kCpuHandleVersion = 1;
constexpr size_t kSegmentNameBytes = 80;

// The wire form of a cpu IpcHandle.
struct CpuHandle {
  uint32_t magic;
  uint32_t version;
  uint64_t total_bytes;  // control + data
  int32_t rank;
  int32_t pid;
  char name[kSegmentNameBytes];  // NUL-terminated
};
static_assert(sizeof(CpuHandle) <= kHandleBytes, "CpuHandle must fit an IpcHandle");

std::string errno_text(int error) { return std::string(std::strerror(error)) + " (errno " + std::to_string(error) + ")"; }

[[noreturn]] void throw_system(std::string const& what, int error) {
  throw RuntimeError(ErrorCode::kSystem, what + ": " + errno_text(error));
}

class CpuStream final : public Stream {
 public:
  void synchronize() override {}
  void* native() const override { return nullptr; }
};

class CpuEvent final : public Event {
 public:
  void record(Stream&) override {
    time_ = std::chrono::steady_clock::now();
    recorded_ = true;
  }
  void synchronize() override {}
  bool query() override { return recorded_; }
  double elapsed_ms_since(Event const& start) const override {
    auto const* other = dynamic_cast<CpuEvent const*>(&start);
    if (other == nullptr || !recorded_ || !other->recorded_)
      throw RuntimeError(ErrorCode::kInvalidArgument, "elapsed_ms_since: both events must be recorded cpu events");
    return std::chrono::duration<double, std::milli>(time_ - other->time_).count();
  }

 private:
  std::chrono::steady_clock::time_point time_{};
  bool recorded_ = false;
};

struct Mapping {
  void* base = nullptr;
  size_t bytes = 0;
};

class CpuRuntime final : public DeviceRuntime {
 public:
  explicit CpuRuntime(RuntimeOptions const& options) : DeviceRuntime(options) {
    if (options_.run_token.empty() || options_.run_token.size() > 32 ||
        options_.run_token.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
      throw RuntimeError(ErrorCode::kInvalidArgument,
                         "run_token must be 1-32 hex digits (the same on every rank), got '" + options_.run_token + "'");
    default_stream_ = std::make_unique<CpuStream>();
  }
  ~CpuRuntime() override { close(); }

  char const* kind() const override { return "cpu"; }

  void allocate(size_t num_bytes) override {
    if (allocated_ || closed_) throw RuntimeError(ErrorCode::kInvalidArgument, "allocate: already called (once per runtime)");
    name_ = cpu_segment_name(options_.run_token, rank());
    size_t const total = kControlBytes + num_bytes;
    int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw_system("shm_open(" + name_ + ", O_CREAT | O_EXCL)", errno);
    name_owned_ = true;
    if (ftruncate(fd, off_t(total)) != 0) {
      int const error = errno;
      ::close(fd);
      release_names();
      throw_system("ftruncate(" + name_ + ", " + std::to_string(total) + " bytes) (is /dev/shm large enough?)", error);
    }
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int const error = errno;
    ::close(fd);
    if (base == MAP_FAILED) {
      release_names();
      throw_system("mmap(" + name_ + ")", error);
    }
    mappings_.assign(size_t(num_ranks()), Mapping{});
    mappings_[size_t(rank())] = {base, total};
    num_bytes_ = num_bytes;
    peer_data_.assign(size_t(num_ranks()), nullptr);
    peer_flags_.assign(size_t(num_ranks()), nullptr);
    set_tables(rank());
    allocated_ = true;
  }

  IpcHandle export_handle() const override {
    check_state("export_handle", true, false);
    CpuHandle handle{};
    handle.magic = kCpuHandleMagic;
    handle.version = kCpuHandleVersion;
    handle.total_bytes = kControlBytes + num_bytes_;
    handle.rank = rank();
    handle.pid = int32_t(getpid());
    std::snprintf(handle.name, sizeof(handle.name), "%s", name_.c_str());
    IpcHandle bytes{};
    std::memcpy(bytes.data(), &handle, sizeof(handle));
    return bytes;
  }

  void open_peers(std::vector<IpcHandle> const& handles) override {
    check_state("open_peers", true, false);
    std::vector<CpuHandle> decoded = decode_peer_handles<CpuHandle>(handles, kCpuHandleMagic, kCpuHandleVersion, "cpu");
    for (int peer = 0; peer < num_ranks(); ++peer) {
      CpuHandle& handle = decoded[size_t(peer)];
      std::string const where = "open_peers: rank " + std::to_string(peer) + "'s handle";
      handle.name[kSegmentNameBytes - 1] = '\0';
      std::string const expected_name = cpu_segment_name(options_.run_token, peer);
      if (expected_name != handle.name)
        throw RuntimeError(ErrorCode::kInvalidArgument, where + " names segment '" + handle.name + "', expected '" +
                                                            expected_name + "' (ranks disagree on the run token?)");
      if (peer == rank()) continue;
      int fd = shm_open(handle.name, O_RDWR, 0);
      if (fd < 0) throw_system("open_peers: shm_open(" + std::string(handle.name) + ") of rank " + std::to_string(peer), errno);
      struct stat info {};
      if (fstat(fd, &info) != 0 || uint64_t(info.st_size) != handle.total_bytes) {
        ::close(fd);
        throw RuntimeError(ErrorCode::kInvalidArgument,
                           where + ": segment has " + std::to_string(info.st_size) + " bytes, the handle says " +
                               std::to_string(handle.total_bytes) + " (ranks passed different num_bytes?)");
      }
      void* base = mmap(nullptr, handle.total_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      int const error = errno;
      ::close(fd);
      if (base == MAP_FAILED) throw_system("open_peers: mmap of rank " + std::to_string(peer) + "'s segment", error);
      mappings_[size_t(peer)] = {base, handle.total_bytes};
      set_tables(peer);
    }
    peers_open_ = true;
  }

  void release_names() override {
    if (!name_owned_) return;
    name_owned_ = false;
    if (shm_unlink(name_.c_str()) != 0 && errno != ENOENT) throw_system("shm_unlink(" + name_ + ")", errno);
  }

  void close_peers() override {
    for (int peer = 0; peer < int(mappings_.size()); ++peer) {
      Mapping& mapping = mappings_[size_t(peer)];
      if (peer == rank() || mapping.base == nullptr) continue;
      munmap(mapping.base, mapping.bytes);
      mapping = Mapping{};
      peer_data_[size_t(peer)] = nullptr;
      peer_flags_[size_t(peer)] = nullptr;
    }
    peers_open_ = false;
  }

  // munmap of this rank's own segment is safe while peers map it (the pages live until the last unmap)
  void abandon() override { close(); }

  void close() override {
    if (closed_) return;
    closed_ = true;
    try {
      release_names();
    } catch (RuntimeError const&) {
      // closing must not throw; the name is gone or was never ours
    }
    for (Mapping& mapping : mappings_)
      if (mapping.base != nullptr) munmap(mapping.base, mapping.bytes);
    mappings_.clear();
    peer_data_.clear();
    peer_flags_.clear();
    allocated_ = peers_open_ = false;
  }

  void* const* device_peer_data_table() const override {
    check_state("device_peer_data_table", true, true);
    return peer_data_.data();
  }
  uint64_t* const* device_peer_flag_table() const override {
    check_state("device_peer_flag_table", true, true);
    return peer_flags_.data();
  }

  void zero(Stream&, size_t offset, size_t num_bytes) override {
    check_state("zero", true, false);
    if (offset > num_bytes_ || num_bytes > num_bytes_ - offset)
      throw RuntimeError(ErrorCode::kInvalidArgument, "zero: [" + std::to_string(offset) + ", +" +
                                                          std::to_string(num_bytes) + ") outside the " +
                                                          std::to_string(num_bytes_) + "-byte buffer");
    std::memset(static_cast<char*>(local_data()) + offset, 0, num_bytes);
  }

  std::unique_ptr<Stream> create_stream() override { return std::make_unique<CpuStream>(); }
  std::unique_ptr<Stream> borrow_stream(void*) override { return std::make_unique<CpuStream>(); }
  std::unique_ptr<Event> create_event() override { return std::make_unique<CpuEvent>(); }
  double clock_ticks_per_second() const override { return 1e9; }

 protected:
  bool launch_peer_barrier(Stream& stream, uint64_t epoch, double timeout_s) override {
    PeerBarrierStatus status{};
    PeerBarrierArgs args{peer_flags_.data(), peer_flags_[size_t(rank())], &status, rank(), num_ranks(), epoch,
                         (long long)(timeout_s * clock_ticks_per_second())};
    CpuLaunchConfig config;
    config.kernel_name = "peer_barrier";
    config.rank = rank();
    config.block = dim3(kPeerBarrierThreads);
    config.timeout_s = timeout_s;
    cpu_launch(stream, config, peer_barrier_kernel, args);
    return status.timed_out != 0;
  }

  std::vector<uint64_t> read_own_flags() override {
    std::vector<uint64_t> flags(static_cast<size_t>(num_ranks()));
    for (int peer = 0; peer < num_ranks(); ++peer)
      flags[size_t(peer)] = std::atomic_ref<uint64_t>(peer_flags_[size_t(rank())][peer]).load(std::memory_order_acquire);
    return flags;
  }

 private:
  void set_tables(int peer) {
    char* base = static_cast<char*>(mappings_[size_t(peer)].base);
    peer_flags_[size_t(peer)] = reinterpret_cast<uint64_t*>(base);
    peer_data_[size_t(peer)] = base + kControlBytes;
  }

  std::string name_;
  bool name_owned_ = false;  // we created the segment and have not unlinked it yet
  bool closed_ = false;
  std::vector<Mapping> mappings_;
  std::vector<uint64_t*> peer_flags_;
};

}  // namespace

std::string cpu_segment_name(std::string const& run_token, int rank) {
  return "/epcomm-" + run_token + "-" + std::to_string(rank);
}

int cpu_unlink_segments(std::string const& run_token, int num_ranks) {
  int removed = 0;
  for (int rank = 0; rank < num_ranks; ++rank)
    if (shm_unlink(cpu_segment_name(run_token, rank).c_str()) == 0) ++removed;
  return removed;
}

std::unique_ptr<DeviceRuntime> make_cpu_runtime(RuntimeOptions const& options) {
  return std::make_unique<CpuRuntime>(options);
}

}  // namespace epcomm::runtime
