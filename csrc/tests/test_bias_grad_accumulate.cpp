// C++ unit tests of the CPU bias_grad_accumulate_ kernel: against double-precision column sums
// for every instruction set, bit-identical across thread counts, and bad input.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cpu/bias_grad_accumulate.h"
#include "cpu/simd.h"
#include "harness.h"

namespace {

using memengine::testing::check;
using memengine::testing::throws_value_error;

void test_isa(const char* isa) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{1, 5}, {7, 33}, {1000, 17}, {3, 300, 65}}) {
      const at::Tensor g = at::randn(shape).to(dtype);
      const int64_t out = shape.back();
      const at::Tensor before = at::randn({out});
      const at::Tensor main_grad = before.clone();
      memengine::cpu::bias_grad_accumulate_(main_grad, g, 0.5, std::nullopt, false);
      const at::Tensor exact = before.to(at::kDouble) + 0.5 * g.reshape({-1, out}).to(at::kDouble).sum(0);
      const double error = (main_grad.to(at::kDouble) - exact).abs().max().item<double>();
      const double rows = static_cast<double>(g.numel() / out);
      // float32 groups of 8 rows: a few float32 roundings per group, relative to the magnitudes summed.
      const double bound = 8 * 6e-8 * std::sqrt(rows) * 4 + exact.abs().max().item<double>() * 1.2e-7;
      check(error <= bound, std::string(isa) + " " + c10::toString(dtype) + " rows=" + std::to_string(g.numel() / out));
    }
  }
  const at::Tensor g = at::randn({5000, 300}).to(at::kBFloat16);
  const at::Tensor one = at::zeros({300}), two = at::zeros({300});
  at::set_num_threads(1);
  memengine::cpu::bias_grad_accumulate_(one, g, 1.0, std::nullopt, true);
  at::set_num_threads(2);
  memengine::cpu::bias_grad_accumulate_(two, g, 1.0, std::nullopt, true);
  check(at::equal(one, two), std::string(isa) + " deterministic across thread counts");
}

}  // namespace

int main() {
  at::manual_seed(0);
  memengine::testing::run_for_each_isa(test_isa);
  check(throws_value_error(
            [] { memengine::cpu::bias_grad_accumulate_(at::zeros({5}), at::zeros({3, 4}), 1.0, std::nullopt, false); }),
        "rejects a column mismatch");
  check(throws_value_error([] {
          memengine::cpu::bias_grad_accumulate_(at::zeros({5}, at::kHalf), at::zeros({3, 5}), 1.0, std::nullopt, false);
        }),
        "rejects a float16 main_grad");
  check(throws_value_error(
            [] {
              memengine::cpu::bias_grad_accumulate_(at::zeros({1}).expand({5}), at::ones({3, 5}), 1.0, std::nullopt,
                                                    false);
            },
            "main_grad has elements that share memory"),
        "rejects an expanded main_grad");
  return memengine::testing::finish();
}
