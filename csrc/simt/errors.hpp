#pragma once
// How a launch fails: one error kind, one message, returned or thrown to the
// host caller (never abort), so a Python binding can raise it.

#include <stdexcept>
#include <string>

namespace epcomm::simt {

enum class ErrorKind {
  None,
  Timeout,          // the watchdog fired: some thread waited longer than the launch's timeout
  Deadlock,         // every live thread of a block is blocked on a barrier or warp collective
  InvalidUsage,     // a SIMT rule was broken: lane outside its mask, barrier thread-count mismatch, ...
  Trap,             // the kernel called __trap() / ptx::trap()
  KernelException,  // any other C++ exception escaped the kernel
  InvalidConfig,    // bad grid/block shape, or the host could not provide threads/stacks
};

inline char const* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::None: return "none";
    case ErrorKind::Timeout: return "timeout";
    case ErrorKind::Deadlock: return "deadlock";
    case ErrorKind::InvalidUsage: return "invalid usage";
    case ErrorKind::Trap: return "trap";
    case ErrorKind::KernelException: return "kernel exception";
    case ErrorKind::InvalidConfig: return "invalid launch configuration";
  }
  return "unknown";
}

class LaunchError : public std::runtime_error {
 public:
  LaunchError(ErrorKind kind, std::string const& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// The result of a launch for callers that prefer an error code to an exception.
struct LaunchStatus {
  ErrorKind kind = ErrorKind::None;
  std::string message;  // empty on success; on failure includes the dump of blocked threads

  bool ok() const { return kind == ErrorKind::None; }
  void throw_if_failed() const {
    if (!ok()) throw LaunchError(kind, message);
  }
};

// Thrown inside a fiber by a SIMT primitive that detects misuse.
class InvalidUsage : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Thrown inside a fiber by __trap().
class KernelTrap : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace epcomm::simt
