#pragma once
// Fiber hooks for ThreadSanitizer and AddressSanitizer; no-ops otherwise.
//
// TSAN: every fiber gets its own TSAN context, and switches between fibers
// use `no_sync`, so a switch never creates a happens-before edge: only the
// barriers, __syncwarp and the memory helpers do, exactly as on a GPU.
// ASan: it must be told which stack is live, or it reports false
// stack-buffer overflows and mis-handles fake stacks.

#include <cstddef>

#if defined(__SANITIZE_THREAD__)
#define EPCOMM_SIMT_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EPCOMM_SIMT_ASAN 1
#endif
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define EPCOMM_SIMT_TSAN 1
#endif
#if __has_feature(address_sanitizer)
#define EPCOMM_SIMT_ASAN 1
#endif
#endif

#if defined(EPCOMM_SIMT_TSAN)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(EPCOMM_SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace epcomm::simt::sanitizer {

#if defined(EPCOMM_SIMT_TSAN) || defined(EPCOMM_SIMT_ASAN)
inline constexpr bool kEnabled = true;
#else
inline constexpr bool kEnabled = false;
#endif

#if defined(EPCOMM_SIMT_TSAN)
inline constexpr bool kThread = true;
#else
inline constexpr bool kThread = false;
#endif

inline void* tsan_current_fiber() {
#if defined(EPCOMM_SIMT_TSAN)
  return __tsan_get_current_fiber();
#else
  return nullptr;
#endif
}

inline void* tsan_create_fiber() {
#if defined(EPCOMM_SIMT_TSAN)
  return __tsan_create_fiber(0);
#else
  return nullptr;
#endif
}

inline void tsan_destroy_fiber(void* fiber) {
#if defined(EPCOMM_SIMT_TSAN)
  if (fiber) __tsan_destroy_fiber(fiber);
#else
  (void)fiber;
#endif
}

// `synchronize`: the switch is a happens-before edge (used only when a fiber
// leaves for good, so its last accesses are ordered before the teardown).
inline void tsan_switch_to_fiber(void* fiber, bool synchronize) {
#if defined(EPCOMM_SIMT_TSAN)
  __tsan_switch_to_fiber(fiber, synchronize ? 0 : __tsan_switch_to_fiber_no_sync);
#else
  (void)fiber, (void)synchronize;
#endif
}

// `fake_stack_save == nullptr` tells ASan the current fiber is left for good.
inline void asan_start_switch(void** fake_stack_save, void const* bottom, size_t size) {
#if defined(EPCOMM_SIMT_ASAN)
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

inline void asan_finish_switch(void* fake_stack_save) {
#if defined(EPCOMM_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack_save, nullptr, nullptr);
#else
  (void)fake_stack_save;
#endif
}

// Abandoned fiber stacks keep the redzones of their live frames; clear them
// before the memory is unmapped so a later mapping at the same address is clean.
inline void asan_unpoison(void* begin, size_t size) {
#if defined(EPCOMM_SIMT_ASAN)
  __asan_unpoison_memory_region(begin, size);
#else
  (void)begin, (void)size;
#endif
}

}  // namespace epcomm::simt::sanitizer
