// Runs the registered SIMT tests; exit status 1 if any failed.
#include <cstdlib>
#include <cstring>

#include "harness.hpp"

int main(int argc, char** argv) {
  using namespace epcomm::test;
  int num_run = 0, num_failed = 0;
  bool const verbose = std::getenv("EPCOMM_TEST_VERBOSE") != nullptr;
  for (TestCase const& test : registry()) {
    bool selected = argc <= 1;
    for (int i = 1; i < argc; ++i) selected = selected || std::strstr(test.name, argv[i]) != nullptr;
    if (!selected) continue;
    ++num_run;
    auto const start = std::chrono::steady_clock::now();
    std::string failure, skipped;
    try {
      test.body();
    } catch (Skipped const& e) {
      skipped = e.what();
    } catch (std::exception const& e) {
      failure = e.what();
    }
    double const ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!skipped.empty()) {
      std::printf("[SKIP] %-44s %s\n", test.name, skipped.c_str());
    } else if (failure.empty()) {
      std::printf("[ OK ] %-44s %8.1f ms\n", test.name, ms);
    } else {
      ++num_failed;
      std::printf("[FAIL] %-44s %8.1f ms\n%s\n", test.name, ms, failure.c_str());
    }
    if (verbose) std::fflush(stdout);
  }
  std::printf("%d tests, %d failed\n", num_run, num_failed);
  return num_failed == 0 && num_run > 0 ? 0 : 1;
}
