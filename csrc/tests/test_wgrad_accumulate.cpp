// C++ unit tests of the CPU wgrad_accumulate_ kernel: every GEMM path that runs here against a
// double-precision product (odd shapes, several packed token blocks, overwrite over NaN, alpha),
// bit-identical across thread counts, and bad input.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cpu/wgrad_accumulate.h"
#include "harness.h"

namespace {

using memengine::testing::check;
using memengine::testing::throws_value_error;

void test_path(const std::string& path, at::ScalarType dtype) {
  const std::string name = path + " " + c10::toString(dtype);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{1, 1, 1}, {7, 33, 5}, {513, 13, 70}, {4100, 25, 40}}) {
    const int64_t tokens = shape[0], out = shape[1], in = shape[2];
    const at::Tensor g = at::randn({tokens, out}).to(dtype), x = at::randn({tokens, in}).to(dtype);
    const at::Tensor product = g.to(at::kDouble).t().mm(x.to(at::kDouble));
    const at::Tensor before = at::randn({out, in});
    at::Tensor main_grad = before.clone();
    memengine::cpu::wgrad_accumulate_(main_grad, g, x, 0.5, std::nullopt, false);
    const at::Tensor exact = before.to(at::kDouble) + 0.5 * product;
    // fp32 sums: a few float32 roundings per term, relative to the magnitudes summed.
    const double bound = 6e-8 * static_cast<double>(tokens) * std::sqrt(static_cast<double>(tokens)) +
                         exact.abs().max().item<double>() * 1.2e-7;
    const double error = (main_grad.to(at::kDouble) - exact).abs().max().item<double>();
    check(error <= bound, name + " tokens=" + std::to_string(tokens) + " error " + std::to_string(error));
    main_grad.fill_(std::numeric_limits<float>::quiet_NaN());
    memengine::cpu::wgrad_accumulate_(main_grad, g, x, 1.0, std::nullopt, true);
    const double overwrite_error = (main_grad.to(at::kDouble) - product).abs().max().item<double>();
    check(overwrite_error <= bound, name + " overwrite ignores the NaN in main_grad, tokens=" + std::to_string(tokens));
  }
  const at::Tensor g = at::randn({3000, 200}).to(dtype), x = at::randn({3000, 90}).to(dtype);
  const at::Tensor one = at::zeros({200, 90}), two = at::zeros({200, 90});
  at::set_num_threads(1);
  memengine::cpu::wgrad_accumulate_(one, g, x, 1.0, std::nullopt, true);
  at::set_num_threads(2);
  memengine::cpu::wgrad_accumulate_(two, g, x, 1.0, std::nullopt, true);
  // Only memengine's own GEMM fixes its summation order. MKL's, and PyTorch's addmm that the chunked
  // path calls, split the sums by thread count (fp32 inputs of this shape: different bits on 1 and 2
  // threads, with oneDNN's precision "none" or "ieee" alike).
  const bool own_gemm = path != "mkl" && path.rfind("chunked", 0) != 0;
  check(!own_gemm || at::equal(one, two), name + " deterministic across thread counts");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const char* path : {"avx512_bf16", "mkl", "chunked"}) {
    try {
      memengine::cpu::set_wgrad_path(path);
    } catch (const c10::ValueError& error) {
      std::printf("skip wgrad path %s: %s\n", path, error.what_without_backtrace());
      continue;
    }
    for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) test_path(path, dtype);
  }
  // The user's process-wide oneDNN precision for fp32 matmuls: the chunked path stays exact under a
  // lowered one and leaves it as it is (it only reads it).
  at::Context& context = at::globalContext();
  const at::Float32Precision users = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  memengine::cpu::set_wgrad_path("chunked");
  for (const auto precision : {at::Float32Precision::BF16, at::Float32Precision::TF32}) {
    context.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, precision);
    const std::string path = "chunked under the user's " + at::precision2str(precision);
    for (const auto dtype : {at::kBFloat16, at::kHalf, at::kFloat}) test_path(path, dtype);
    check(context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) == precision,
          path + ": the setting is left alone");
  }
  context.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, users);
  memengine::cpu::set_wgrad_path("auto");
  check(throws_value_error([] { memengine::cpu::set_wgrad_path("fast"); }), "rejects an unknown path");
  check(throws_value_error([] {
          memengine::cpu::wgrad_accumulate_(at::zeros({3, 4}), at::zeros({6, 5}), at::zeros({6, 4}), 1.0, std::nullopt,
                                            false);
        }),
        "rejects an out-feature mismatch");
  check(throws_value_error([] {
          memengine::cpu::wgrad_accumulate_(at::zeros({3, 4}), at::zeros({6, 3}, at::kBFloat16),
                                            at::zeros({6, 4}, at::kHalf), 1.0, std::nullopt, false);
        }),
        "rejects mixed input dtypes");
  const at::Tensor buffer = at::zeros({40});
  check(throws_value_error([&] {
          memengine::cpu::wgrad_accumulate_(buffer.slice(0, 0, 12).view({3, 4}), at::zeros({6, 3}),
                                            buffer.slice(0, 10, 34).view({6, 4}), 1.0, std::nullopt, false);
        }),
        "rejects main_grad overlapping input");
  return memengine::testing::finish();
}
