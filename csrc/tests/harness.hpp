#pragma once
// A minimal test harness: EPCOMM_TEST(name) registers a test, CHECK(...)
// fails it with file:line. `simt_tests [substring...]` runs the tests whose
// names contain any of the substrings (all tests without arguments).

#include <chrono>
#include <cstdio>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace epcomm::test {

struct TestCase {
  char const* name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(char const* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

class CheckFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown by a test that does not apply to this build (e.g. too slow under a sanitizer); reported as [SKIP].
class Skipped : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// True under ThreadSanitizer or AddressSanitizer: tests shrink their sizes.
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
inline constexpr bool kSanitized = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer) || __has_feature(address_sanitizer)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
#else
inline constexpr bool kSanitized = false;
#endif

}  // namespace epcomm::test

#define EPCOMM_TEST_CONCAT_(a, b) a##b
#define EPCOMM_TEST_CONCAT(a, b) EPCOMM_TEST_CONCAT_(a, b)
#define EPCOMM_TEST(name)                                                                                  \
  static void name();                                                                                      \
  static ::epcomm::test::Registrar EPCOMM_TEST_CONCAT(registrar_, name)(#name, &name);                     \
  static void name()

#define CHECK(condition)                                                                                   \
  do {                                                                                                     \
    if (!(condition))                                                                                      \
      throw ::epcomm::test::CheckFailure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +          \
                                         ": CHECK(" #condition ") failed");                                \
  } while (0)

#define CHECK_EQ(a, b)                                                                                     \
  do {                                                                                                     \
    auto const& check_a_ = (a);                                                                            \
    auto const& check_b_ = (b);                                                                            \
    if (!(check_a_ == check_b_)) {                                                                         \
      std::ostringstream check_message_;                                                                   \
      check_message_ << __FILE__ << ":" << __LINE__ << ": CHECK_EQ(" #a ", " #b ") failed: " << check_a_   \
                     << " != " << check_b_;                                                                \
      throw ::epcomm::test::CheckFailure(check_message_.str());                                            \
    }                                                                                                      \
  } while (0)

// The launch must fail with `expected_kind`; returns the error message for further checks.
#define CHECK_LAUNCH_FAILS(status_expression, expected_kind)                                               \
  [&] {                                                                                                    \
    ::epcomm::simt::LaunchStatus check_status_ = (status_expression);                                      \
    if (check_status_.kind != (expected_kind))                                                             \
      throw ::epcomm::test::CheckFailure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +          \
                                         ": expected a launch failure of kind '" +                         \
                                         ::epcomm::simt::error_kind_name(expected_kind) + "', got '" +     \
                                         ::epcomm::simt::error_kind_name(check_status_.kind) + "': " +     \
                                         check_status_.message);                                           \
    return check_status_.message;                                                                          \
  }()

#define CHECK_CONTAINS(text, fragment)                                                                     \
  do {                                                                                                     \
    std::string const check_text_ = (text);                                                                \
    if (check_text_.find(fragment) == std::string::npos)                                                   \
      throw ::epcomm::test::CheckFailure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +          \
                                         ": expected to find \"" + (fragment) + "\" in:\n" + check_text_); \
  } while (0)
