#pragma once
// The one switch between epcomm's two targets for kernel code (the only
// place that tests __CUDACC__; tools/lint.sh enforces it):
//   CUDA (nvcc):      the real qualifiers and built-ins.
//   SIMT (host C++):  the same names backed by epcomm::simt, which runs each
//                     block on an OS thread and each CUDA thread as a fiber
//                     (see csrc/simt/simt.hpp).
// Kernels include this header (never cuda_runtime.h) and common/ptx.cuh for
// memory-ordering helpers. Launches: `<<<>>>` in .cu launcher files for CUDA,
// epcomm::simt::launch(...) for SIMT.
//
//   EPCOMM_HOST_DEVICE / EPCOMM_DEVICE / EPCOMM_GLOBAL   function qualifiers
//   EPCOMM_LAUNCH_BOUNDS(n)                              __launch_bounds__ (CUDA only)
//   EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(n, b)                __launch_bounds__(n, b): without b, ptxas aims at
//                                                        two 1024-thread blocks per SM (32 registers) and spills
//   EPCOMM_DYNAMIC_SMEM(T, name)                         `T* name` = the block's dynamic shared memory
//   EPCOMM_SYNC_SITE_PARAM / EPCOMM_SYNC_SITE_ONLY_PARAM defaulted call-site parameter of host helpers
//   __shared__                                           static shared memory; on SIMT a thread_local
//                                                        of the block's OS thread (zero-initialised)

#if defined(__CUDACC__)

#define EPCOMM_TARGET_CUDA 1
#define EPCOMM_TARGET_SIMT 0

#define EPCOMM_HOST_DEVICE __host__ __device__ __forceinline__
#define EPCOMM_DEVICE __device__ __forceinline__
#define EPCOMM_GLOBAL __global__
#define EPCOMM_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads)
#define EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(max_threads, min_blocks) __launch_bounds__(max_threads, min_blocks)
#define EPCOMM_DYNAMIC_SMEM(T, name)                                         \
  extern __shared__ __align__(1024) unsigned char epcomm_dynamic_smem_bytes[]; \
  T* name = reinterpret_cast<T*>(epcomm_dynamic_smem_bytes)
#define EPCOMM_SYNC_SITE_PARAM
#define EPCOMM_SYNC_SITE_ONLY_PARAM

#else

#define EPCOMM_TARGET_CUDA 0
#define EPCOMM_TARGET_SIMT 1

#include "../simt/cuda_builtins.hpp"
#include "../simt/simt.hpp"

#define EPCOMM_HOST_DEVICE inline
#define EPCOMM_DEVICE inline
#define EPCOMM_GLOBAL inline
#define EPCOMM_LAUNCH_BOUNDS(max_threads)
#define EPCOMM_LAUNCH_BOUNDS_MIN_BLOCKS(max_threads, min_blocks)
#define EPCOMM_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::epcomm::simt::dynamic_shared_memory())
#define EPCOMM_SYNC_SITE_PARAM , ::epcomm::simt::SyncSite site = ::epcomm::simt::SyncSite::current()
#define EPCOMM_SYNC_SITE_ONLY_PARAM ::epcomm::simt::SyncSite site = ::epcomm::simt::SyncSite::current()

// CUDA's qualifiers and built-in variables, for code written CUDA-style.
#ifndef __host__
#define __host__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif
#ifndef __restrict__
#define __restrict__ __restrict
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif
// One copy per block: the block's OS thread owns it. Starts zeroed, unlike on a GPU.
#define __shared__ thread_local

using dim3 = ::epcomm::simt::Dim3;
#define threadIdx (::epcomm::simt::thread_index())
#define blockIdx (::epcomm::simt::block_index())
#define blockDim (::epcomm::simt::block_dimensions())
#define gridDim (::epcomm::simt::grid_dimensions())

#endif
