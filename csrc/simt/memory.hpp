#pragma once
// Memory operations that are sync points: the host side of the ptx.cuh
// load/store/atomic/fence helpers and of the CUDA atomics.
//
// Each maps to std::atomic_ref with the memory order its PTX twin has
// (ld.acquire -> acquire, st.release -> release, ld.relaxed / ld.volatile ->
// relaxed, CUDA atomics -> relaxed RMW, fences -> seq_cst), whatever the
// scope (.cta/.gpu/.sys all act as system scope here). Each also lets the
// other threads of the block run, so a GPU-style polling loop needs no
// change: loads yield before reading (the value returned is as fresh as
// possible), stores and RMWs after writing (the waiter runs next). Called
// outside a launch (plain host code), they are just the atomic operation.

#include <atomic>
#include <chrono>
#include <cstring>
#include <type_traits>

#include "block.hpp"
#include "sync_site.hpp"

namespace epcomm::simt {

namespace detail {

// The scheduler of the calling CUDA thread, or nullptr in plain host code.
inline Scheduler* current_scheduler() {
  Block* block = Block::current();
  return block && block->scheduler().in_fiber() ? &block->scheduler() : nullptr;
}

template <class T>
uint64_t to_bits(T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "at most 8 trivially copyable bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <class T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// Read-modify-write through a compare-exchange loop (atomicMax/Min/Inc).
template <class T, class Update>
T fetch_update(std::atomic_ref<T> ref, Update&& update) {
  T old = ref.load(std::memory_order_relaxed);
  while (!ref.compare_exchange_weak(old, update(old), std::memory_order_relaxed)) {
  }
  return old;
}

template <class T>
std::atomic_ref<T> atomic_at(T const* address) {
  return std::atomic_ref<T>(*const_cast<T*>(address));
}

}  // namespace detail

// A sync point with no memory effect (clock64, nanosleep, activemask, ...).
inline void sync_yield(SyncKind kind, char const* what, SyncSite const& site) {
  if (Scheduler* scheduler = detail::current_scheduler()) {
    scheduler->current().wait.record(kind, what, site);
    scheduler->pass();
  }
}

template <class T>
T sync_load(T const* address, std::memory_order order, char const* what, SyncSite const& site) {
  Scheduler* scheduler = detail::current_scheduler();
  if (scheduler) {
    scheduler->current().wait.record(SyncKind::Load, what, site, reinterpret_cast<uintptr_t>(address));
    scheduler->pass();
  }
  T value = detail::atomic_at(address).load(order);
  if (scheduler) scheduler->current().wait.last_value.store(detail::to_bits(value));
  return value;
}

template <class T>
void sync_store(T* address, T value, std::memory_order order, char const* what, SyncSite const& site) {
  detail::atomic_at(address).store(value, order);
  if (Scheduler* scheduler = detail::current_scheduler()) {
    scheduler->current().wait.record(SyncKind::Store, what, site, reinterpret_cast<uintptr_t>(address));
    scheduler->current().wait.last_value.store(detail::to_bits(value));
    scheduler->pass();
  }
}

// `operation(std::atomic_ref<T>)` performs the read-modify-write and returns the old value.
template <class T, class Operation>
T sync_rmw(T* address, Operation&& operation, char const* what, SyncSite const& site) {
  T old = operation(std::atomic_ref<T>(*address));
  if (Scheduler* scheduler = detail::current_scheduler()) {
    scheduler->current().wait.record(SyncKind::Atomic, what, site, reinterpret_cast<uintptr_t>(address));
    scheduler->current().wait.last_value.store(detail::to_bits(old));
    scheduler->pass();
  }
  return old;
}

// Note: ThreadSanitizer does not model stand-alone fences; prefer
// release stores / acquire loads in protocols that TSAN must check.
inline void sync_fence(char const* what, SyncSite const& site) {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  sync_yield(SyncKind::Fence, what, site);
}

// clock64() on the CPU: nanoseconds of a steady clock (a "1 GHz" clock).
inline long long sync_clock64(SyncSite const& site) {
  sync_yield(SyncKind::Clock, "clock64", site);
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace epcomm::simt
