#pragma once
// The CUDA built-in names kernels use, defined for the SIMT target (global
// namespace, like CUDA's own). Included only through common/compat.cuh.
// Each sync point takes a defaulted SyncSite so dumps can name the caller's
// file and line.

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "block.hpp"
#include "memory.hpp"
#include "warp.hpp"

namespace epcomm::simt {

// The calling CUDA thread's block; a clear error when called from plain host code.
inline Block& current_block_or_throw(char const* what) {
  Block* block = Block::current();
  if (!block || !block->scheduler().in_fiber())
    throw std::logic_error(std::string("epcomm simt: ") + what +
                           " used outside a kernel launched with epcomm::simt::launch");
  return *block;
}

inline Dim3 const& thread_index() { return current_block_or_throw("threadIdx").scheduler().current().thread_idx; }
inline Dim3 const& block_index() { return current_block_or_throw("blockIdx").block_idx(); }
inline Dim3 const& block_dimensions() { return current_block_or_throw("blockDim").block_dim(); }
inline Dim3 const& grid_dimensions() { return current_block_or_throw("gridDim").grid_dim(); }
inline void* dynamic_shared_memory() { return current_block_or_throw("dynamic shared memory").dynamic_smem(); }

// One warp collective by the calling lane; returns this lane's result bits.
inline uint64_t warp_exchange(WarpOp op, uint32_t mask, uint64_t value, uint32_t source_lane, char const* what,
                              SyncSite const& site) {
  Block& block = current_block_or_throw(what);
  SimtThread& me = block.scheduler().current();
  return block.warp(me.warp_idx).exchange(op, mask, value, source_lane, what, site);
}

inline uint32_t current_lane() { return current_block_or_throw("lane id").scheduler().current().lane_idx; }

inline void check_shuffle_width(int width, char const* what, SyncSite const& site) {
  if (width <= 0 || width > int(kWarpSize) || (width & (width - 1)) != 0)
    throw InvalidUsage(std::string(what) + " at " + site.file_name() + ":" + std::to_string(site.line()) +
                       ": width " + std::to_string(width) + " must be a power of two in [1, 32]");
}

template <class T>
T shuffle(uint32_t mask, T value, uint32_t source_lane, char const* what, SyncSite const& site) {
  return detail::from_bits<T>(
      warp_exchange(WarpOp::Shuffle, mask, detail::to_bits(value), source_lane, what, site));
}

}  // namespace epcomm::simt

#define EPCOMM_SIMT_SITE ::epcomm::simt::SyncSite site = ::epcomm::simt::SyncSite::current()

inline constexpr int warpSize = 32;

// ---- Block barriers -------------------------------------------------------

inline void __syncthreads(EPCOMM_SIMT_SITE) {
  ::epcomm::simt::current_block_or_throw("__syncthreads").barriers().sync_all(site);
}

// ---- Warp collectives -----------------------------------------------------

inline void __syncwarp(unsigned mask = 0xffffffffu, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::warp_exchange(::epcomm::simt::WarpOp::SyncWarp, mask, 0, 0, "__syncwarp", site);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::check_shuffle_width(width, "__shfl_sync", site);
  uint32_t lane = ::epcomm::simt::current_lane();
  uint32_t source = (lane & ~uint32_t(width - 1)) + (uint32_t(src_lane) & uint32_t(width - 1));
  return ::epcomm::simt::shuffle(mask, var, source, "__shfl_sync", site);
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::check_shuffle_width(width, "__shfl_up_sync", site);
  uint32_t lane = ::epcomm::simt::current_lane();
  uint32_t source = (lane & uint32_t(width - 1)) >= delta ? lane - delta : lane;
  return ::epcomm::simt::shuffle(mask, var, source, "__shfl_up_sync", site);
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::check_shuffle_width(width, "__shfl_down_sync", site);
  uint32_t lane = ::epcomm::simt::current_lane();
  uint32_t source = (lane & uint32_t(width - 1)) + delta < uint32_t(width) ? lane + delta : lane;
  return ::epcomm::simt::shuffle(mask, var, source, "__shfl_down_sync", site);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::check_shuffle_width(width, "__shfl_xor_sync", site);
  uint32_t lane = ::epcomm::simt::current_lane();
  uint32_t source = lane ^ uint32_t(lane_mask);
  // A later group of `width` lanes is out of reach: the caller keeps its own value.
  if (source / uint32_t(width) > lane / uint32_t(width)) source = lane;
  return ::epcomm::simt::shuffle(mask, var, source, "__shfl_xor_sync", site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, EPCOMM_SIMT_SITE) {
  return unsigned(::epcomm::simt::warp_exchange(::epcomm::simt::WarpOp::Ballot, mask, predicate != 0, 0,
                                                "__ballot_sync", site));
}

inline int __any_sync(unsigned mask, int predicate, EPCOMM_SIMT_SITE) {
  return int(
      ::epcomm::simt::warp_exchange(::epcomm::simt::WarpOp::Any, mask, predicate != 0, 0, "__any_sync", site));
}

inline int __all_sync(unsigned mask, int predicate, EPCOMM_SIMT_SITE) {
  return int(
      ::epcomm::simt::warp_exchange(::epcomm::simt::WarpOp::All, mask, predicate != 0, 0, "__all_sync", site));
}

// The CPU cannot tell which lanes are converged: this is every lane that has
// not exited. Code that takes __activemask() inside a divergent branch and
// then syncs on it will wait for the other lanes (and fail as a deadlock).
inline unsigned __activemask(EPCOMM_SIMT_SITE) {
  auto& block = ::epcomm::simt::current_block_or_throw("__activemask");
  unsigned mask = block.warp(block.scheduler().current().warp_idx).live_mask();
  ::epcomm::simt::sync_yield(::epcomm::simt::SyncKind::Clock, "__activemask", site);
  return mask;
}

// ---- Atomics: relaxed read-modify-writes ------------------------------------

#define EPCOMM_SIMT_RMW(name, expression)                                                                 \
  template <class T>                                                                                      \
  T name(T* address, std::type_identity_t<T> val, EPCOMM_SIMT_SITE) {                                   \
    return ::epcomm::simt::sync_rmw(address, [&](std::atomic_ref<T> ref) { return expression; }, #name, site); \
  }                                                                                                       \
  template <class T>                                                                                      \
  T name##_block(T* address, std::type_identity_t<T> val, EPCOMM_SIMT_SITE) {                            \
    return name(address, val, site);                                                                      \
  }                                                                                                       \
  template <class T>                                                                                      \
  T name##_system(T* address, std::type_identity_t<T> val, EPCOMM_SIMT_SITE) {                           \
    return name(address, val, site);                                                                      \
  }

EPCOMM_SIMT_RMW(atomicAdd, ref.fetch_add(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicSub, ref.fetch_sub(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicExch, ref.exchange(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicAnd, ref.fetch_and(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicOr, ref.fetch_or(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicXor, ref.fetch_xor(val, std::memory_order_relaxed))
EPCOMM_SIMT_RMW(atomicMax, ::epcomm::simt::detail::fetch_update(ref, [&](T old) { return old < val ? val : old; }))
EPCOMM_SIMT_RMW(atomicMin, ::epcomm::simt::detail::fetch_update(ref, [&](T old) { return val < old ? val : old; }))
EPCOMM_SIMT_RMW(atomicInc, ::epcomm::simt::detail::fetch_update(ref, [&](T old) { return old >= val ? T(0) : T(old + 1); }))
#undef EPCOMM_SIMT_RMW

template <class T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val, EPCOMM_SIMT_SITE) {
  return ::epcomm::simt::sync_rmw(
      address,
      [&](std::atomic_ref<T> ref) {
        T expected = compare;
        ref.compare_exchange_strong(expected, val, std::memory_order_relaxed);
        return expected;
      },
      "atomicCAS", site);
}
template <class T>
T atomicCAS_system(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val, EPCOMM_SIMT_SITE) {
  return atomicCAS(address, compare, val, site);
}

// ---- Fences, clocks, traps --------------------------------------------------

inline void __threadfence(EPCOMM_SIMT_SITE) { ::epcomm::simt::sync_fence("__threadfence", site); }
inline void __threadfence_block(EPCOMM_SIMT_SITE) { ::epcomm::simt::sync_fence("__threadfence_block", site); }
inline void __threadfence_system(EPCOMM_SIMT_SITE) { ::epcomm::simt::sync_fence("__threadfence_system", site); }

inline long long clock64(EPCOMM_SIMT_SITE) { return ::epcomm::simt::sync_clock64(site); }

inline void __nanosleep(unsigned /*ns*/, EPCOMM_SIMT_SITE) {
  ::epcomm::simt::sync_yield(::epcomm::simt::SyncKind::Clock, "__nanosleep", site);
}

[[noreturn]] inline void __trap(EPCOMM_SIMT_SITE) {
  throw ::epcomm::simt::KernelTrap(std::string("__trap() at ") + site.file_name() + ":" +
                                   std::to_string(site.line()) + " (" + site.function_name() + ")");
}

// ---- Plain loads and bit tricks (no sync point) -------------------------------

template <class T>
T __ldg(T const* address) {
  return *address;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  x = (x >> 1 & 0x55555555u) | (x & 0x55555555u) << 1;
  x = (x >> 2 & 0x33333333u) | (x & 0x33333333u) << 2;
  x = (x >> 4 & 0x0f0f0f0fu) | (x & 0x0f0f0f0fu) << 4;
  x = (x >> 8 & 0x00ff00ffu) | (x & 0x00ff00ffu) << 8;
  return x >> 16 | x << 16;
}
