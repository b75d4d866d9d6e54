// Run-time detection and selection of the CPU instruction set (see simd.h).
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "simd.h"

namespace memengine::cpu {
namespace {

Isa parse_isa(const char* name, bool* ok) {
  *ok = true;
  if (std::strcmp(name, "avx512") == 0) return Isa::avx512;
  if (std::strcmp(name, "avx2") == 0) return Isa::avx2;
  if (std::strcmp(name, "scalar") == 0) return Isa::scalar;
  *ok = false;
  return Isa::scalar;
}

Isa detect_isa() {
#if defined(MEMENGINE_X86_SIMD)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::avx2;
  }
#endif
  return Isa::scalar;
}

Isa initial_isa() {
  const Isa best = detect_isa();
  const char* requested = std::getenv("MEMENGINE_CPU_ISA");
  if (requested == nullptr || *requested == '\0') {
    return best;
  }
  bool ok = false;
  const Isa isa = parse_isa(requested, &ok);
  // An unusable request must not make the library unusable; the lower of the two is safe.
  // `python -m memengine info` shows the ISA actually in use.
  return ok && isa < best ? isa : best;
}

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

Isa best_supported_isa() {
  static const Isa best = detect_isa();
  return best;
}

Isa active_isa() { return active().load(std::memory_order_relaxed); }

void set_active_isa(const char* name) {
  bool ok = false;
  const Isa isa = parse_isa(name, &ok);
  TORCH_CHECK_VALUE(ok, "unknown CPU ISA '", name, "'; use one of scalar, avx2, avx512");
  TORCH_CHECK_VALUE(isa <= best_supported_isa(), "CPU ISA '", name,
                    "' is not supported on this machine (best: ", isa_name(best_supported_isa()), ")");
  active().store(isa, std::memory_order_relaxed);
}

}  // namespace memengine::cpu
