#pragma once
// Saving and restoring a fiber's registers: the only host assembly in the
// project (tools/lint.sh allow-lists this file; kernel PTX lives in
// common/ptx.cuh). x86-64 gets a hand-written switch of the callee-saved
// registers (~tens of ns); other architectures, or -DEPCOMM_SIMT_FORCE_UCONTEXT,
// use ucontext, which is portable but makes a sigprocmask syscall per switch.

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && !defined(EPCOMM_SIMT_FORCE_UCONTEXT)
#define EPCOMM_SIMT_X86_64_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace epcomm::simt::detail {

// A fiber's first function. It must never return: a fiber ends by switching
// away for good.
using FiberEntry = void (*)(void*);

#if defined(EPCOMM_SIMT_X86_64_SWITCH)

extern "C" {
// Pushes the System V callee-saved registers plus MXCSR and the x87 control
// word on the current stack, stores the stack pointer to *save_sp, then loads
// load_sp and pops the same set from there.
__attribute__((naked, noinline)) inline void epcomm_simt_swap_stack(void** /*save_sp*/, void* /*load_sp*/) {
  __asm__ volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}

// First "return address" of a new fiber: calls entry(arg) with entry in r13
// and arg in r12, as laid out by MachineContext::prepare. The stack is
// 16-byte aligned here, as the call requires.
__attribute__((naked, noinline)) inline void epcomm_simt_fiber_trampoline() {
  __asm__ volatile(
      "xorl %ebp, %ebp\n\t"
      "movq %r12, %rdi\n\t"
      "callq *%r13\n\t"
      "ud2\n\t");
}
}  // extern "C"

class MachineContext {
 public:
  void prepare(void* stack_low, size_t stack_size, FiberEntry entry, void* arg) {
    auto top = (reinterpret_cast<uintptr_t>(stack_low) + stack_size) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    // Popped in this order by the swap: csr word, r15, r14, r13, r12, rbx, rbp, return address.
    slot[-1] = reinterpret_cast<uint64_t>(&epcomm_simt_fiber_trampoline);
    slot[-2] = 0;                                   // rbp
    slot[-3] = 0;                                   // rbx
    slot[-4] = reinterpret_cast<uint64_t>(arg);     // r12
    slot[-5] = reinterpret_cast<uint64_t>(entry);   // r13
    slot[-6] = 0;                                   // r14
    slot[-7] = 0;                                   // r15
    slot[-8] = uint64_t(0x037F) << 32 | 0x1F80;     // x87 control word | MXCSR defaults
    sp_ = &slot[-8];
  }
  static void swap(MachineContext& from, MachineContext& to) { epcomm_simt_swap_stack(&from.sp_, to.sp_); }

 private:
  void* sp_ = nullptr;
};

#else  // ucontext fallback

class MachineContext {
 public:
  void prepare(void* stack_low, size_t stack_size, FiberEntry entry, void* arg) {
    getcontext(&context_);
    context_.uc_stack.ss_sp = stack_low;
    context_.uc_stack.ss_size = stack_size;
    context_.uc_link = nullptr;
    entry_ = entry;
    arg_ = arg;
    // makecontext passes int arguments only: split the pointer.
    auto self = reinterpret_cast<uintptr_t>(this);
    makecontext(&context_, reinterpret_cast<void (*)()>(&MachineContext::start), 2,
                unsigned(self >> 32), unsigned(self & 0xffffffffu));
  }
  static void swap(MachineContext& from, MachineContext& to) { swapcontext(&from.context_, &to.context_); }

 private:
  static void start(unsigned high, unsigned low) {
    auto* self = reinterpret_cast<MachineContext*>(uintptr_t(high) << 32 | low);
    self->entry_(self->arg_);
  }
  ucontext_t context_{};
  FiberEntry entry_ = nullptr;
  void* arg_ = nullptr;
};

#endif

}  // namespace epcomm::simt::detail
