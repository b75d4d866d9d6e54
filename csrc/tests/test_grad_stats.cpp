// C++ unit tests of the CPU grad_stats_ and clip_ kernels: results against a double-precision
// loop for every instruction set, bit-identical across thread counts, and bad input.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>

#include "cpu/grad_stats.h"
#include "cpu/simd.h"
#include "harness.h"

namespace {

using memengine::testing::check;
using memengine::testing::throws_value_error;

void test_isa(const char* isa) {
  for (const int64_t n : {0, 1, 15, 16, 17, 65536, 65537, 300001}) {
    at::Tensor flat = at::randn({n}) * 10;
    if (n > 20) {
      flat[3] = std::numeric_limits<float>::quiet_NaN();
      flat[9] = -std::numeric_limits<float>::infinity();
    }
    const at::Tensor expected_flat = flat * 0.25f;
    double squares = 0.0;
    int64_t nonfinite = 0;
    auto e = expected_flat.accessor<float, 1>();
    for (int64_t i = 0; i < n; ++i) {
      if (std::isfinite(e[i])) {
        squares += static_cast<double>(e[i]) * e[i];
      } else {
        ++nonfinite;
      }
    }
    const at::Tensor stats = memengine::cpu::grad_stats_(flat, 0.25, std::nullopt);
    const std::string name = std::string(isa) + " n=" + std::to_string(n);
    check(at::equal(at::nan_to_num(flat), at::nan_to_num(expected_flat)), name + " scaled values");
    const float norm = static_cast<float>(std::sqrt(squares));
    check(std::fabs(stats[0].item<float>() - norm) <= std::fabs(norm) * 1.2e-7f, name + " norm");
    check(stats[1].item<float>() == static_cast<float>(nonfinite), name + " non-finite count");
  }
  // Finite values whose norm float32 cannot hold: +inf, counted as one more non-finite value.
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  const float kInf = std::numeric_limits<float>::infinity();
  struct LargeNorm {
    const char* name;
    at::Tensor values;
    float norm, nonfinite;
  };
  const LargeNorm large_norms[] = {
      {"representable 1e32", at::full({10000}, 1e30f), static_cast<float>(std::sqrt(1e4 * double{1e30f} * 1e30f)), 0},
      {"overflowing", at::full({100}, 3e38f), kInf, 1},
      {"just above FLT_MAX", at::tensor({std::numeric_limits<float>::max(), std::ldexp(1.0f, 110)}), kInf, 1},
      {"overflowing with a NaN", at::cat({at::full({100}, 3e38f), at::tensor({kNaN})}), kInf, 2},
  };
  for (const LargeNorm& large : large_norms) {
    const at::Tensor stats = memengine::cpu::grad_stats_(large.values.clone(), 1.0, std::nullopt);
    const std::string name = std::string(isa) + " " + large.name;
    const float norm = stats[0].item<float>();
    check(std::isinf(large.norm) ? norm == large.norm : std::fabs(norm - large.norm) <= large.norm * 1.2e-7f,
          name + " norm");
    check(stats[1].item<float>() == large.nonfinite, name + " non-finite count");
  }

  const at::Tensor flat = at::randn({1000003});
  at::set_num_threads(1);
  const at::Tensor one_thread = memengine::cpu::grad_stats_(flat.clone(), 0.5, std::nullopt);
  at::set_num_threads(2);
  const at::Tensor two_threads = memengine::cpu::grad_stats_(flat.clone(), 0.5, std::nullopt);
  check(at::equal(one_thread, two_threads), std::string(isa) + " deterministic across thread counts");
}

}  // namespace

int main() {
  at::manual_seed(0);
  memengine::testing::run_for_each_isa(test_isa);

  at::Tensor flat = at::ones({100});
  const at::Tensor stats = memengine::cpu::grad_stats_(flat, 1.0, std::nullopt);  // norm 10
  memengine::cpu::clip_(flat, stats, 1.0);
  check(std::fabs(flat.norm().item<float>() - 1.0f) < 1e-5f, "clip_ scales to max_norm");
  const at::Tensor skipped = at::ones({100});
  memengine::cpu::clip_(skipped, at::tensor({10.0f, 1.0f}), 1.0);
  check(at::equal(skipped, at::ones({100})), "clip_ leaves a step with non-finite values alone");
  for (const float norm : {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    const at::Tensor untouched = at::ones({100});
    memengine::cpu::clip_(untouched, at::tensor({norm, 0.0f}), 1.0);
    check(at::equal(untouched, at::ones({100})), "clip_ leaves the buffer alone when the norm is " +
                                                     std::to_string(norm));
  }
  check(throws_value_error([] { memengine::cpu::grad_stats_(at::zeros({4}, at::kHalf), 1.0, std::nullopt); }),
        "grad_stats_ rejects float16");
  check(throws_value_error([] { memengine::cpu::clip_(at::zeros({4}), at::zeros({3}), 1.0); }),
        "clip_ rejects malformed stats");

  return memengine::testing::finish();
}
