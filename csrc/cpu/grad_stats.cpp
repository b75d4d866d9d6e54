// CPU kernel of grad_stats_: flat <- flat * scale, returns [L2 norm of the finite scaled values,
// count of non-finite values] in one pass over memory (a norm beyond float32's range is +inf and
// counted as one more non-finite value; see finish_grad_stats in memengine/grad_stats.h).
//
// Determinism: the buffer is cut into fixed 64 Ki-element blocks whatever the thread count;
// each block sums its squares in a fixed order and the block sums are added in block order.
// With scale == 1 nothing is written back, so the pass only reads.
#include "grad_stats.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "memengine/grad_stats.h"
#include "memengine/grad_stats_checks.h"
#include "memengine/scalar_argument.h"
#include "simd.h"

namespace memengine::cpu {
namespace {

constexpr int64_t kBlock = 1 << 16;

struct BlockStats {
  double sum_of_squares = 0.0;
  int64_t nonfinite = 0;
};

template <bool Scale>
BlockStats grad_stats_block_scalar(float* x, int64_t n, float scale) {
  BlockStats stats;
  for (int64_t i = 0; i < n; ++i) {
    const float v = Scale ? memengine::multiply(x[i], scale) : x[i];
    if (Scale) x[i] = v;
    stats.sum_of_squares += square_if_finite(v);
    stats.nonfinite += is_finite_value(v) ? 0 : 1;
  }
  return stats;
}

#if defined(MEMENGINE_X86_SIMD)
// The same arithmetic as the scalar loop (multiply in float32, square and sum in double) with
// eight double lanes per half vector; two accumulators break the add dependency chain.
template <bool Scale>
MEMENGINE_TARGET_AVX512 BlockStats grad_stats_block_avx512(float* x, int64_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  __m512d low_sum = _mm512_setzero_pd(), high_sum = _mm512_setzero_pd();
  int64_t nonfinite = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    if (Scale) {
      v = _mm512_mul_ps(v, s);
      _mm512_storeu_ps(x + i, v);
    }
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
    nonfinite += 16 - __builtin_popcount(finite);
    const __m512 clean = _mm512_maskz_mov_ps(finite, v);
    const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(clean));
    const __m512d high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(clean), 1)));
    low_sum = _mm512_fmadd_pd(low, low, low_sum);
    high_sum = _mm512_fmadd_pd(high, high, high_sum);
  }
  BlockStats stats = grad_stats_block_scalar<Scale>(x + i, n - i, scale);
  stats.sum_of_squares += _mm512_reduce_add_pd(low_sum) + _mm512_reduce_add_pd(high_sum);
  stats.nonfinite += nonfinite;
  return stats;
}
#endif

BlockStats grad_stats_block(float* x, int64_t n, float scale) {
  const bool scaled = scale != 1.0f;  // x * 1 == x: skip the write-back
#if defined(MEMENGINE_X86_SIMD)
  if (active_isa() == Isa::avx512) {
    return scaled ? grad_stats_block_avx512<true>(x, n, scale) : grad_stats_block_avx512<false>(x, n, scale);
  }
#endif
  return scaled ? grad_stats_block_scalar<true>(x, n, scale) : grad_stats_block_scalar<false>(x, n, scale);
}

}  // namespace

at::Tensor grad_stats_(const at::Tensor& flat, double scale, const std::optional<at::Tensor>& scale_tensor) {
  check_grad_stats_args(flat, scale_tensor);
  TORCH_CHECK_VALUE(flat.device().is_cpu(), "grad_stats_: flat is on ", flat.device(),
                    " but the CPU kernel was called");
  const float s = host_scalar(scale, scale_tensor);
  const int64_t n = flat.numel();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<BlockStats> partial(static_cast<size_t>(blocks));
  float* x = n > 0 ? flat.data_ptr<float>() : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock;
      partial[static_cast<size_t>(b)] = grad_stats_block(x + first, std::min(kBlock, n - first), s);
    }
  });
  double sum_of_squares = 0.0;
  int64_t nonfinite = 0;
  for (const BlockStats& block : partial) {  // fixed order: deterministic
    sum_of_squares += block.sum_of_squares;
    nonfinite += block.nonfinite;
  }
  at::Tensor result = at::empty({2}, flat.options());
  finish_grad_stats(sum_of_squares, nonfinite, result.data_ptr<float>());
  return result;
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) { m.impl("grad_stats_", &grad_stats_); }

}  // namespace memengine::cpu
