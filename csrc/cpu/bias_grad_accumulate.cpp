// CPU kernel of bias_grad_accumulate_:
//   main_grad <- (overwrite ? 0 : main_grad) + alpha * (column sums of grad_output as [rows, out]).
//
// Deterministic: the rows are cut into bias_grad_chunk_count(rows) fixed chunks (any thread
// count gives the same cut); within a chunk, groups of 8 rows are added in float32 and each
// group sum is added to a double accumulator per column; chunk sums are added in chunk order.
// The final update is memengine::accumulate_value, the accumulate_ arithmetic.
#include "bias_grad_accumulate.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "memengine/accumulate.h"
#include "memengine/bias_grad_checks.h"
#include "memengine/scalar_argument.h"
#include "simd.h"

namespace memengine::cpu {
namespace {

constexpr int64_t kGroup = 8;

template <class Src>
MEMENGINE_ALWAYS_INLINE float to_float(Src x) {
  return static_cast<float>(x);
}

// Adds rows [0, rows) of `g` (row stride `ld` elements) into `sums` (double, one per column).
// Written as plain loops over columns: they vectorise without reassociating any sum.
template <class Src>
MEMENGINE_ALWAYS_INLINE void column_sums_into(const Src* g, int64_t ld, int64_t rows, int64_t columns, double* sums) {
  int64_t r = 0;
  for (; r + kGroup <= rows; r += kGroup) {
    const Src* row = g + r * ld;
    for (int64_t c = 0; c < columns; ++c) {
      float group = to_float(row[c]);
      for (int64_t k = 1; k < kGroup; ++k) group += to_float(row[k * ld + c]);
      sums[c] += static_cast<double>(group);
    }
  }
  for (; r < rows; ++r) {
    const Src* row = g + r * ld;
    for (int64_t c = 0; c < columns; ++c) sums[c] += static_cast<double>(to_float(row[c]));
  }
}

#if defined(MEMENGINE_X86_SIMD)
// The same arithmetic as column_sums_into, sixteen columns at a time: the loads convert
// bf16/fp16 to float32 with the accumulate_ kernel's SIMD loads (vcvtph2ps for fp16, which
// the compiler does not produce from c10::Half's scalar conversion).
template <class Src>
MEMENGINE_TARGET_AVX512 void column_sums_avx512(const Src* g, int64_t ld, int64_t rows, int64_t columns, double* sums) {
  constexpr int64_t W = Avx512Floats::kWidth;
  const int64_t vector_columns = columns / W * W;
  int64_t r = 0;
  for (; r + kGroup <= rows; r += kGroup) {
    const Src* row = g + r * ld;
    for (int64_t c = 0; c < vector_columns; c += W) {
      __m512 group = Avx512Floats::load(row + c).v;
      for (int64_t k = 1; k < kGroup; ++k) group = _mm512_add_ps(group, Avx512Floats::load(row + k * ld + c).v);
      const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(group));
      const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(group), 1)));
      _mm512_storeu_pd(sums + c, _mm512_add_pd(_mm512_loadu_pd(sums + c), low));
      _mm512_storeu_pd(sums + c + 8, _mm512_add_pd(_mm512_loadu_pd(sums + c + 8), high));
    }
  }
  column_sums_into(g + r * ld, ld, rows - r, vector_columns, sums);  // fewer than kGroup rows left
  // The last columns (fewer than W), with the same grouping as above.
  column_sums_into(g + vector_columns, ld, rows, columns - vector_columns, sums + vector_columns);
}
#endif

template <class Src>
void column_sums(const Src* g, int64_t ld, int64_t rows, int64_t columns, double* sums) {
#if defined(MEMENGINE_X86_SIMD)
  if (active_isa() == Isa::avx512) return column_sums_avx512(g, ld, rows, columns, sums);
#endif
  column_sums_into(g, ld, rows, columns, sums);
}

template <class Src>
std::vector<double> chunked_column_sums(const at::Tensor& g2) {
  const int64_t rows = g2.size(0), columns = g2.size(1), ld = g2.stride(0);
  const int64_t chunks = bias_grad_chunk_count(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  std::vector<double> partial(static_cast<size_t>(chunks * columns), 0.0);
  const Src* g = static_cast<const Src*>(g2.const_data_ptr());
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t first = k * rows_per_chunk;
      const int64_t count = std::max<int64_t>(0, std::min(rows_per_chunk, rows - first));
      column_sums(g + first * ld, ld, count, columns, partial.data() + k * columns);
    }
  });
  for (int64_t k = 1; k < chunks; ++k) {  // chunk order: deterministic
    for (int64_t c = 0; c < columns; ++c)
      partial[static_cast<size_t>(c)] += partial[static_cast<size_t>(k * columns + c)];
  }
  partial.resize(static_cast<size_t>(columns));
  return partial;
}

}  // namespace

void bias_grad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, double alpha,
                           const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_bias_grad_args(main_grad, grad_output, alpha_tensor);
  TORCH_CHECK_VALUE(main_grad.device().is_cpu(), "bias_grad_accumulate_: main_grad is on ", main_grad.device(),
                    " but the CPU kernel was called");
  const int64_t columns = main_grad.size(0);
  if (columns == 0) return;
  const float a = host_scalar(alpha, alpha_tensor);
  // A view when the leading dimensions can be flattened; a copy only otherwise.
  at::Tensor g2 = grad_output.reshape({-1, columns});
  if (g2.stride(1) != 1 || g2.stride(0) < columns) g2 = g2.contiguous();
  std::vector<double> sums(static_cast<size_t>(columns), 0.0);
  if (g2.size(0) > 0) {
    switch (g2.scalar_type()) {
      case at::kBFloat16:
        sums = chunked_column_sums<c10::BFloat16>(g2);
        break;
      case at::kHalf:
        sums = chunked_column_sums<c10::Half>(g2);
        break;
      default:
        sums = chunked_column_sums<float>(g2);
        break;
    }
  }
  auto out = main_grad.accessor<float, 1>();
  for (int64_t c = 0; c < columns; ++c) {
    const float total = static_cast<float>(sums[static_cast<size_t>(c)]);
    out[c] = overwrite ? accumulate_value<true>(out[c], total, a) : accumulate_value<false>(out[c], total, a);
  }
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) { m.impl("bias_grad_accumulate_", &bias_grad_accumulate_); }

}  // namespace memengine::cpu
