// A minimal test harness for the C++ unit tests (no external test framework is needed):
// check() records results, run_for_each_isa() repeats a test on every CPU instruction set the
// machine supports, and finish() prints the closing "N passed, N failed" line.
#pragma once

#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>

#include "cpu/simd.h"

namespace memengine::testing {

inline int& passed() {
  static int count = 0;
  return count;
}

inline int& failed() {
  static int count = 0;
  return count;
}

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed();
  } else {
    ++failed();
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// True if `call` throws c10::ValueError (Python's ValueError) whose message contains `needle`.
inline bool throws_value_error(const std::function<void()>& call, const std::string& needle = "") {
  try {
    call();
  } catch (const c10::ValueError& error) {
    return std::string(error.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

inline void run_for_each_isa(const std::function<void(const char*)>& test) {
  const auto best = memengine::cpu::best_supported_isa();
  for (const auto isa : {memengine::cpu::Isa::scalar, memengine::cpu::Isa::avx2, memengine::cpu::Isa::avx512}) {
    const char* name = memengine::cpu::isa_name(isa);
    if (isa > best) {
      std::printf("skipped %s: not supported by this CPU\n", name);
      continue;
    }
    memengine::cpu::set_active_isa(name);
    test(name);
  }
  memengine::cpu::set_active_isa(memengine::cpu::isa_name(best));
}

inline int finish() {
  std::printf("%d passed, %d failed\n", passed(), failed());
  return failed() == 0 ? 0 : 1;
}

}  // namespace memengine::testing
