// C++ unit tests of the CPU accumulate kernels, for every instruction set this CPU supports:
// results are compared bit for bit with a scalar std::fma loop (the arithmetic the kernels
// promise), on odd sizes, strided views, both alpha forms and bad input.
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>

#include "cpu/accumulate.h"
#include "cpu/simd.h"
#include "harness.h"

namespace {

using memengine::testing::check;
using memengine::testing::throws_value_error;

// Expected result computed element by element in double precision from the same inputs.
at::Tensor expected(const at::Tensor& dst, const at::Tensor& src, float alpha, bool overwrite) {
  at::Tensor out = dst.clone();
  const at::Tensor s = src.to(at::kFloat);
  auto out_a = out.accessor<float, 1>();
  auto s_a = s.accessor<float, 1>();
  for (int64_t i = 0; i < out.size(0); ++i) {
    out_a[i] = overwrite ? alpha * s_a[i] : std::fma(alpha, s_a[i], out_a[i]);
  }
  return out;
}

void test_isa(const char* isa) {
  for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t n : {0, 1, 7, 15, 16, 17, 63, 64, 65, 1000, 100003}) {
      for (const bool overwrite : {false, true}) {
        const at::Tensor dst = at::randn({n});
        const at::Tensor src = at::randn({n}).to(dtype);
        const at::Tensor want = expected(dst, src, 0.37f, overwrite);
        memengine::cpu::accumulate_(dst, src, 0.37, std::nullopt, overwrite);
        check(at::equal(dst, want), std::string(isa) + " " + c10::toString(dtype) + " n=" + std::to_string(n) +
                                        (overwrite ? " overwrite" : " accumulate"));
      }
    }
    // Strided: every other element of both, and a tensor alpha.
    const at::Tensor dst_base = at::randn({2001});
    const at::Tensor src_base = at::randn({2002}).to(dtype);
    const at::Tensor dst = dst_base.slice(0, 0, 2001, 2);
    const at::Tensor src = src_base.slice(0, 1, 2002, 2);
    const at::Tensor want = expected(dst, src.contiguous(), -1.5f, false);
    memengine::cpu::accumulate_(dst, src, 1.0, at::scalar_tensor(-1.5, at::kFloat), false);
    check(at::equal(dst, want), std::string(isa) + " strided " + c10::toString(dtype));
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  memengine::testing::run_for_each_isa(test_isa);

  const at::Tensor f32 = at::zeros({4});
  check(throws_value_error([&] { memengine::cpu::accumulate_(f32.to(at::kHalf), f32, 1.0, std::nullopt, false); },
                           "dst must be float32"),
        "rejects a float16 dst");
  check(
      throws_value_error([&] { memengine::cpu::accumulate_(f32, at::zeros({4}, at::kInt), 1.0, std::nullopt, false); },
                         "src must be float32, bfloat16 or float16"),
      "rejects an integer src");
  check(throws_value_error([&] { memengine::cpu::accumulate_(f32, at::zeros({5}), 1.0, std::nullopt, false); },
                           "src has shape [5] but dst has shape [4]"),
        "rejects a shape mismatch");
  const at::Tensor buffer = at::zeros({20});
  check(throws_value_error(
            [&] {
              memengine::cpu::accumulate_(buffer.slice(0, 0, 10), buffer.slice(0, 5, 15), 1.0, std::nullopt, false);
            },
            "overlap in memory"),
        "rejects overlapping dst and src");
  check(throws_value_error(
            [&] { memengine::cpu::multi_accumulate_({f32, f32.clone()}, {f32.clone()}, 1.0, std::nullopt, false); },
            "dsts has 2 tensors but srcs has 1"),
        "rejects lists of different lengths");

  return memengine::testing::finish();
}
