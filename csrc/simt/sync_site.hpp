#pragma once
// What a CUDA thread is doing at its latest sync point, for watchdog dumps.

#include <cstdint>
#include <source_location>

#include "relaxed.hpp"

namespace epcomm::simt {

// The call site of a sync point: captured by a defaulted
// `SyncSite site = SyncSite::current()` parameter of every host-side helper.
using SyncSite = std::source_location;

enum class SyncKind : uint8_t {
  None,          // has not reached a sync point yet
  Barrier,       // __syncthreads / bar_sync / bar_arrive (detail_a = barrier id, detail_b = thread count)
  WarpCollective,// __syncwarp, shuffles, votes, elect (detail_a = member mask)
  Load,          // acquire / relaxed / volatile load helper (address, last value)
  Store,         // release / relaxed store helper
  Atomic,        // read-modify-write
  Fence,         // __threadfence*, fence.*
  Clock,         // clock64 / nanosleep / activemask: a plain yield point
};

// Written by the fiber itself, read by the dump (possibly from another OS
// thread while the launch runs): every field is a relaxed atomic.
struct WaitRecord {
  Relaxed<SyncKind> kind{SyncKind::None};
  Relaxed<char const*> what{nullptr};  // helper name, e.g. "ld_acquire_sys_global"
  Relaxed<char const*> file{nullptr};
  Relaxed<char const*> function{nullptr};
  Relaxed<uint32_t> line{0};
  Relaxed<uintptr_t> address{0};
  Relaxed<uint64_t> detail_a{0};
  Relaxed<uint64_t> detail_b{0};
  Relaxed<uint64_t> last_value{0};
  Relaxed<uint64_t> repeats{0};  // consecutive hits of the same site and address: a spin loop's poll count

  void record(SyncKind new_kind, char const* new_what, SyncSite const& site, uintptr_t new_address = 0,
              uint64_t a = 0, uint64_t b = 0) {
    bool same = what.load() == new_what && line.load() == site.line() && file.load() == site.file_name() &&
                address.load() == new_address;
    repeats.store(same ? repeats.load() + 1 : 1);
    kind.store(new_kind);
    what.store(new_what);
    file.store(site.file_name());
    function.store(site.function_name());
    line.store(site.line());
    address.store(new_address);
    detail_a.store(a);
    detail_b.store(b);
  }
};

}  // namespace epcomm::simt
