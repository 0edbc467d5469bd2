#pragma once
// Every inline-PTX helper of epcomm, each with its SIMT twin.
//
// Names carry memory order, scope and space (ld_acquire_sys_global). On the
// SIMT target each maps to std::atomic_ref with the same memory order (scope
// is always "system") and is a sync point: the other threads of the block get
// to run, so polling loops written for the GPU work unchanged on the CPU.
// Helpers marked "not a sync point" never yield: do not poll with them.
// This is the only file allowed to contain `asm` (tools/lint.sh).

#include <cstdint>
#include <type_traits>

#include "compat.cuh"

namespace epcomm::ptx {

template <class T>
inline constexpr bool kIsPtxWord = std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8);

#define EPCOMM_PTX_REQUIRE_WORD(T) \
  static_assert(::epcomm::ptx::kIsPtxWord<T>, "ptx helpers take 4- or 8-byte integers")

/// Loads

// Defines `T name(T const* ptr)` from one PTX load instruction and its host memory order.
#define EPCOMM_PTX_LOAD(name, instruction, host_order)                                               \
  template <class T>                                                                                 \
  EPCOMM_DEVICE T name(T const* ptr EPCOMM_SYNC_SITE_PARAM) {                                        \
    EPCOMM_PTX_REQUIRE_WORD(T);                                                                      \
    EPCOMM_PTX_LOAD_BODY(name, instruction, host_order)                                              \
  }

#if EPCOMM_TARGET_CUDA
#define EPCOMM_PTX_LOAD_BODY(name, instruction, host_order)                                          \
  if constexpr (sizeof(T) == 4) {                                                                    \
    uint32_t value;                                                                                  \
    asm volatile(instruction ".b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");                \
    return static_cast<T>(value);                                                                    \
  } else {                                                                                           \
    uint64_t value;                                                                                  \
    asm volatile(instruction ".b64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");                \
    return static_cast<T>(value);                                                                    \
  }
#else
#define EPCOMM_PTX_LOAD_BODY(name, instruction, host_order) \
  return ::epcomm::simt::sync_load(ptr, host_order, #name, site);
#endif

// Acquire at system scope: later reads see everything the releasing writer wrote before it.
#if defined(EPCOMM_PLANT_RELAXED_ACQUIRE)
// Planted bug (make -C csrc sass-check): a relaxed load where the acquire belongs; tools/check_sass.py must fail.
EPCOMM_PTX_LOAD(ld_acquire_sys_global, "ld.relaxed.sys.global", std::memory_order_acquire)
#else
EPCOMM_PTX_LOAD(ld_acquire_sys_global, "ld.acquire.sys.global", std::memory_order_acquire)
#endif
EPCOMM_PTX_LOAD(ld_acquire_gpu_global, "ld.acquire.gpu.global", std::memory_order_acquire)
// Relaxed / volatile: a fresh value, no ordering. For polling a counter whose data is fenced separately.
EPCOMM_PTX_LOAD(ld_relaxed_sys_global, "ld.relaxed.sys.global", std::memory_order_relaxed)
EPCOMM_PTX_LOAD(ld_volatile_global, "ld.volatile.global", std::memory_order_relaxed)

#undef EPCOMM_PTX_LOAD
#undef EPCOMM_PTX_LOAD_BODY

// Read-only path (ld.global.nc): only for data that no one writes during the kernel. Not a sync point.
template <class T>
EPCOMM_DEVICE T ld_nc_global(T const* ptr) {
  EPCOMM_PTX_REQUIRE_WORD(T);
#if EPCOMM_TARGET_CUDA
  if constexpr (sizeof(T) == 4) {
    uint32_t value;
    asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(value) : "l"(ptr));
    return static_cast<T>(value);
  } else {
    uint64_t value;
    asm volatile("ld.global.nc.b64 %0, [%1];" : "=l"(value) : "l"(ptr));
    return static_cast<T>(value);
  }
#else
  return *ptr;
#endif
}

/// Stores

#define EPCOMM_PTX_STORE(name, instruction, host_order)                                               \
  template <class T>                                                                                  \
  EPCOMM_DEVICE void name(T* ptr, T value EPCOMM_SYNC_SITE_PARAM) {                                   \
    EPCOMM_PTX_REQUIRE_WORD(T);                                                                       \
    EPCOMM_PTX_STORE_BODY(name, instruction, host_order)                                              \
  }

#if EPCOMM_TARGET_CUDA
#define EPCOMM_PTX_STORE_BODY(name, instruction, host_order)                                          \
  if constexpr (sizeof(T) == 4) {                                                                     \
    asm volatile(instruction ".b32 [%0], %1;" ::"l"(ptr), "r"(static_cast<uint32_t>(value)) : "memory"); \
  } else {                                                                                            \
    asm volatile(instruction ".b64 [%0], %1;" ::"l"(ptr), "l"(static_cast<uint64_t>(value)) : "memory"); \
  }
#else
#define EPCOMM_PTX_STORE_BODY(name, instruction, host_order) \
  ::epcomm::simt::sync_store(ptr, value, host_order, #name, site);
#endif

// Release at system scope: everything written before is visible to an acquiring reader of this value.
EPCOMM_PTX_STORE(st_release_sys_global, "st.release.sys.global", std::memory_order_release)
// Relaxed: no ordering of earlier writes. (Publishing data with it is a bug TSAN reports.)
EPCOMM_PTX_STORE(st_relaxed_sys_global, "st.relaxed.sys.global", std::memory_order_relaxed)

#undef EPCOMM_PTX_STORE
#undef EPCOMM_PTX_STORE_BODY

// Plain store that skips L1 allocation (st.global.L1::no_allocate). Not a sync point.
template <class T>
EPCOMM_DEVICE void st_na_global(T* ptr, T value) {
  EPCOMM_PTX_REQUIRE_WORD(T);
#if EPCOMM_TARGET_CUDA
  if constexpr (sizeof(T) == 4) {
    asm volatile("st.global.L1::no_allocate.b32 [%0], %1;" ::"l"(ptr), "r"(static_cast<uint32_t>(value)));
  } else {
    asm volatile("st.global.L1::no_allocate.b64 [%0], %1;" ::"l"(ptr), "l"(static_cast<uint64_t>(value)));
  }
#else
  *ptr = value;
#endif
}

/// Atomics

// Returns the old value; a release RMW at system scope (e.g. "add to a tail after writing the data").
template <class T>
EPCOMM_DEVICE T atomic_add_release_sys_global(T* ptr, T value EPCOMM_SYNC_SITE_PARAM) {
  EPCOMM_PTX_REQUIRE_WORD(T);
#if EPCOMM_TARGET_CUDA
  if constexpr (sizeof(T) == 4) {
    uint32_t old;
    asm volatile("atom.release.sys.global.add.u32 %0, [%1], %2;"
                 : "=r"(old)
                 : "l"(ptr), "r"(static_cast<uint32_t>(value))
                 : "memory");
    return static_cast<T>(old);
  } else {
    uint64_t old;
    asm volatile("atom.release.sys.global.add.u64 %0, [%1], %2;"
                 : "=l"(old)
                 : "l"(ptr), "l"(static_cast<uint64_t>(value))
                 : "memory");
    return static_cast<T>(old);
  }
#else
  return ::epcomm::simt::sync_rmw(
      ptr, [&](std::atomic_ref<T> ref) { return ref.fetch_add(value, std::memory_order_release); },
      "atomic_add_release_sys_global", site);
#endif
}

/// Fences

#if EPCOMM_TARGET_CUDA
#define EPCOMM_PTX_FENCE(name, instruction) \
  EPCOMM_DEVICE void name() { asm volatile(instruction ::: "memory"); }
#else
#define EPCOMM_PTX_FENCE(name, instruction) \
  EPCOMM_DEVICE void name(EPCOMM_SYNC_SITE_ONLY_PARAM) { ::epcomm::simt::sync_fence(#name, site); }
#endif

EPCOMM_PTX_FENCE(fence_acq_rel_sys, "fence.acq_rel.sys;")
EPCOMM_PTX_FENCE(fence_acq_rel_gpu, "fence.acq_rel.gpu;")
EPCOMM_PTX_FENCE(fence_acq_rel_cta, "fence.acq_rel.cta;")

#undef EPCOMM_PTX_FENCE

/// Named barriers

// bar.sync id, num_threads: waits until num_threads threads (a multiple of 32) arrived at barrier `id`.
EPCOMM_DEVICE void bar_sync(uint32_t id, uint32_t num_threads EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
#else
  ::epcomm::simt::current_block_or_throw("bar_sync").barriers().sync(id, num_threads, "bar_sync", site);
#endif
}

// bar.arrive id, num_threads: counts towards barrier `id` without waiting (producer side).
EPCOMM_DEVICE void bar_arrive(uint32_t id, uint32_t num_threads EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
#else
  ::epcomm::simt::current_block_or_throw("bar_arrive").barriers().arrive_only(id, num_threads, "bar_arrive", site);
#endif
}

/// Warp

// The lane index of the calling thread (not a sync point).
EPCOMM_DEVICE uint32_t get_lane_id() {
#if EPCOMM_TARGET_CUDA
  uint32_t lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
#else
  return ::epcomm::simt::current_lane();
#endif
}

// True in exactly one lane of `mask` (the lowest that has not exited); all lanes of `mask` must call it.
EPCOMM_DEVICE bool elect_one_sync(uint32_t mask = 0xffffffffu EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t elected = 0;
  asm volatile(
      "{\n\t.reg .pred is_leader;\n\t"
      "elect.sync _|is_leader, %1;\n\t"
      "selp.u32 %0, 1, 0, is_leader;\n\t}"
      : "=r"(elected)
      : "r"(mask));
  return elected != 0;
#else
  __syncwarp(mask);
  return get_lane_id() == uint32_t(__ffs(mask) - 1);
#endif
#else
  return ::epcomm::simt::warp_exchange(::epcomm::simt::WarpOp::Elect, mask, 0, 0, "elect_one_sync", site) != 0;
#endif
}

// __syncwarp: the warp-level barrier that also orders memory among its lanes.
EPCOMM_DEVICE void syncwarp(uint32_t mask = 0xffffffffu EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  __syncwarp(mask);
#else
  __syncwarp(mask, site);
#endif
}

// Value of `value` in lane `source_lane`. Exchanges values only: it does NOT order memory (use syncwarp).
template <class T>
EPCOMM_DEVICE T shfl_sync(uint32_t mask, T value, int source_lane EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  return __shfl_sync(mask, value, source_lane);
#else
  return __shfl_sync(mask, value, source_lane, warpSize, site);
#endif
}

// Bit i set if lane i of `mask` passed a true predicate. Does NOT order memory.
EPCOMM_DEVICE uint32_t ballot_sync(uint32_t mask, bool predicate EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  return __ballot_sync(mask, predicate);
#else
  return __ballot_sync(mask, predicate, site);
#endif
}

/// Time

// %clock64: SM cycles on a GPU; nanoseconds on the SIMT target (a "1 GHz clock").
EPCOMM_DEVICE long long read_clock64(EPCOMM_SYNC_SITE_ONLY_PARAM) {
#if EPCOMM_TARGET_CUDA
  uint64_t cycles;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(cycles));
  return static_cast<long long>(cycles);
#else
  return ::epcomm::simt::sync_clock64(site);
#endif
}

EPCOMM_DEVICE void nanosleep_ns(uint32_t ns EPCOMM_SYNC_SITE_PARAM) {
#if EPCOMM_TARGET_CUDA
  asm volatile("nanosleep.u32 %0;" ::"r"(ns));
#else
  (void)ns;
  ::epcomm::simt::sync_yield(::epcomm::simt::SyncKind::Clock, "nanosleep_ns", site);
#endif
}

/// Errors

// Kills the CUDA context on a GPU; on the SIMT target the launch fails with ErrorKind::Trap.
[[noreturn]] EPCOMM_DEVICE void trap(EPCOMM_SYNC_SITE_ONLY_PARAM) {
#if EPCOMM_TARGET_CUDA
  asm volatile("trap;");
  __builtin_unreachable();
#else
  __trap(site);
#endif
}

#undef EPCOMM_PTX_REQUIRE_WORD

}  // namespace epcomm::ptx
