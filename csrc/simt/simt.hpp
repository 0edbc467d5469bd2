#pragma once
// epcomm's SIMT-on-CPU layer: runs CUDA-style kernel source on the host.
// Host code includes this for the launch API; kernel code includes
// common/compat.cuh (which also brings in the CUDA built-in names).
//
//   dim3.hpp, relaxed.hpp        small value types
//   context_switch.hpp, fiber.hpp  fiber stacks and register switching
//   sanitizer.hpp                TSAN / ASan fiber annotations
//   scheduler.hpp                fibers of one block, round-robin or fuzzed
//   barrier.hpp, warp.hpp        __syncthreads / bar.sync, warp collectives
//   memory.hpp                   loads/stores/atomics/fences as sync points
//   block.hpp                    one block = one OS thread
//   watchdog.hpp, dump.hpp       time limit and the "who waits on what" dump
//   launch.hpp                   launch(), ConcurrentLaunch
//   cuda_builtins.hpp            __syncthreads, __shfl_sync, atomicAdd, ... (via compat.cuh)

#include "errors.hpp"
#include "launch.hpp"
#include "memory.hpp"
