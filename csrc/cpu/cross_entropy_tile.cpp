// CPU kernels of cross_entropy_tile_forward_ and cross_entropy_tile_backward_: one vocabulary tile of a
// language model's cross-entropy, logits transposed ([tile, rows]: a token's logits lie `rows` floats apart,
// sixteen tokens side by side in one 64-byte line). The formulas are memengine/cross_entropy_tile.h's; the
// scalar path calls them, the AVX-512 path computes them sixteen tokens at a time in the same order, with
// its own exp and tanh (below; within a few units in the last place of the C library's).
//
// Forward: each thread takes blocks of 16 tokens and makes two passes over the tile for them: transform
// (written back: the op leaves z in logits), maximum, label's logit and sum; then the sum of exp(z - max).
// A block's column of the tile (tile x 64 bytes: 256 KiB at the default chunk for hidden 256) stays in the
// core's cache between the passes. Backward is elementwise and walks the tile in memory order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "memengine/cross_entropy_tile.h"
#include "memengine/cross_entropy_tile_checks.h"
#include "simd.h"

namespace memengine::cpu {
namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kElementsPerTask = 1 << 15;  // enough work to pay for a task of at::parallel_for

struct Tile {
  float* logits;
  const float* bias;  // null: no bias
  const int64_t* labels;
  int64_t start, tile, rows;
  float scale, softcap;

  float bias_at(int64_t v) const { return bias == nullptr ? 0.0f : bias[v]; }
};

struct ForwardRows {
  float *running_max, *running_sum, *target, *logit_sum;  // logit_sum may be null
};

struct BackwardRows {
  const float *lse, *probability_scale, *row_scale;
  float uniform, target_weight;
};

void forward_rows_scalar(const Tile& t, const ForwardRows& out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t label = label_in_tile(t.labels[r], t.start, t.tile);
    float tile_max = -std::numeric_limits<float>::infinity(), capped;
    double sum = 0.0;
    for (int64_t v = 0; v < t.tile; ++v) {
      float& x = t.logits[v * t.rows + r];
      x = transformed_logit(x, t.bias_at(v), t.scale, t.softcap, capped);
      tile_max = fmaxf(tile_max, x);
      sum += x;
    }
    double tile_sum = 0.0;
    for (int64_t v = 0; v < t.tile; ++v) tile_sum += expf(t.logits[v * t.rows + r] - tile_max);
    if (label >= 0) out.target[r] += t.logits[label * t.rows + r];
    if (out.logit_sum != nullptr) out.logit_sum[r] += static_cast<float>(sum);
    merge_log_sum_exp(out.running_max[r], out.running_sum[r], tile_max, static_cast<float>(tile_sum));
  }
}

void backward_rows_scalar(const Tile& t, const BackwardRows& in, int64_t v0, int64_t v1) {
  const bool has_cap = t.softcap > 0.0f;
  for (int64_t v = v0; v < v1; ++v) {
    float* row = t.logits + v * t.rows;
    for (int64_t r = 0; r < t.rows; ++r) {
      float capped;
      const float z = transformed_logit(row[r], t.bias_at(v), t.scale, t.softcap, capped);
      const bool is_label = label_in_tile(t.labels[r], t.start, t.tile) == v;
      row[r] = logit_gradient(z, capped, is_label, in.lse[r], in.probability_scale[r], in.row_scale[r], in.uniform,
                              in.target_weight, t.scale, has_cap);
    }
  }
}

#if defined(MEMENGINE_X86_SIMD)
// exp(x) for sixteen floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite), exp(r) by
// its Taylor polynomial to r^7 (truncation below 6e-9 relative), times 2^n by scalef, which also gives 0 and
// inf at the ends of the clamp. NaN passes the clamp (max/min return their second operand for a NaN).
MEMENGINE_TARGET_AVX512 inline void exp_parts(__m512 x, __m512& n, __m512& r) {
  n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
}

// exp(r) - 1 for |r| <= ln2 / 2, without the cancellation of exp(r) - 1 near 0.
MEMENGINE_TARGET_AVX512 inline __m512 expm1_small(__m512 r) {
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_mul_ps(p, r);
}

MEMENGINE_TARGET_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  __m512 n, r;
  exp_parts(x, n, r);
  return _mm512_scalef_ps(_mm512_add_ps(expm1_small(r), _mm512_set1_ps(1.0f)), n);
}

// tanh(x) = e / (e + 2) with e = expm1(2x) = 2^n (expm1(r) + 1) - 1: accurate near 0, where 1 - 2 / (exp(2x) + 1)
// would cancel. 2x is clamped to [-20, 20], where tanh is +-1 to float precision.
MEMENGINE_TARGET_AVX512 inline __m512 tanh512(__m512 x) {
  const __m512 y = _mm512_min_ps(_mm512_set1_ps(20.0f), _mm512_max_ps(_mm512_set1_ps(-20.0f), _mm512_add_ps(x, x)));
  __m512 n, r;
  exp_parts(y, n, r);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = _mm512_add_ps(_mm512_scalef_ps(expm1_small(r), n), _mm512_sub_ps(_mm512_scalef_ps(one, n), one));
  return _mm512_div_ps(e, _mm512_add_ps(e, _mm512_set1_ps(2.0f)));
}

// Sixteen float sums kept in double (two halves): a tile's sums run over thousands of entries, and float
// partial sums in entry order lose more than the pairwise sums of torch's reference do.
struct DoubleSums {
  __m512d low, high;
};

MEMENGINE_TARGET_AVX512 inline void add_to(DoubleSums& sums, __m512 x) {
  sums.low = _mm512_add_pd(sums.low, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
  sums.high = _mm512_add_pd(sums.high, _mm512_cvtps_pd(high));
}

MEMENGINE_TARGET_AVX512 inline void store_rounded(const DoubleSums& sums, float* out) {
  _mm256_storeu_ps(out, _mm512_cvtpd_ps(sums.low));
  _mm256_storeu_ps(out + 8, _mm512_cvtpd_ps(sums.high));
}

// transformed_logit for sixteen tokens.
MEMENGINE_TARGET_AVX512 inline __m512 transformed_logit512(__m512 raw, float bias, __m512 scale, float softcap,
                                                           __m512& capped) {
  const __m512 z = _mm512_mul_ps(_mm512_add_ps(raw, _mm512_set1_ps(bias)), scale);
  if (softcap <= 0.0f) return z;
  const __m512 cap = _mm512_set1_ps(softcap);
  capped = tanh512(_mm512_div_ps(z, cap));
  return _mm512_mul_ps(capped, cap);
}

// The labels of tokens [r, r + 16) as tile indices (-1: not in the tile; lanes past `mask` get -1 too).
MEMENGINE_TARGET_AVX512 inline __m512i label_indices(const Tile& t, int64_t r, __mmask16 mask) {
  alignas(64) int32_t index[kRowBlock];
  for (int64_t j = 0; j < kRowBlock; ++j) {
    index[j] = (mask >> j) & 1 ? static_cast<int32_t>(label_in_tile(t.labels[r + j], t.start, t.tile)) : -1;
  }
  return _mm512_load_si512(index);
}

MEMENGINE_TARGET_AVX512 void forward_block_avx512(const Tile& t, const ForwardRows& out, int64_t r0,
                                                  __mmask16 mask) {
  const __m512i labels = label_indices(t, r0, mask);
  const __m512 scale = _mm512_set1_ps(t.scale);
  __m512 tile_max = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 target = _mm512_setzero_ps(), capped = _mm512_setzero_ps();
  DoubleSums sum{_mm512_setzero_pd(), _mm512_setzero_pd()}, tile_sum{_mm512_setzero_pd(), _mm512_setzero_pd()};
  for (int64_t v = 0; v < t.tile; ++v) {
    float* p = t.logits + v * t.rows + r0;
    const __m512 z = transformed_logit512(_mm512_maskz_loadu_ps(mask, p), t.bias_at(v), scale, t.softcap, capped);
    _mm512_mask_storeu_ps(p, mask, z);
    tile_max = _mm512_max_ps(tile_max, z);
    add_to(sum, z);
    const __mmask16 is_label = _mm512_cmpeq_epi32_mask(labels, _mm512_set1_epi32(static_cast<int32_t>(v)));
    target = _mm512_mask_add_ps(target, is_label, target, z);
  }
  for (int64_t v = 0; v < t.tile; ++v) {
    const __m512 z = _mm512_maskz_loadu_ps(mask, t.logits + v * t.rows + r0);
    add_to(tile_sum, exp512(_mm512_sub_ps(z, tile_max)));
  }
  alignas(64) float lanes[4][kRowBlock];
  _mm512_store_ps(lanes[0], tile_max);
  store_rounded(tile_sum, lanes[1]);
  _mm512_store_ps(lanes[2], target);
  store_rounded(sum, lanes[3]);
  for (int64_t j = 0; j < kRowBlock; ++j) {
    if (!((mask >> j) & 1)) continue;
    const int64_t r = r0 + j;
    out.target[r] += lanes[2][j];
    if (out.logit_sum != nullptr) out.logit_sum[r] += lanes[3][j];
    merge_log_sum_exp(out.running_max[r], out.running_sum[r], lanes[0][j], lanes[1][j]);
  }
}

MEMENGINE_TARGET_AVX512 void backward_rows_avx512(const Tile& t, const BackwardRows& in, const int32_t* labels,
                                                  int64_t v0, int64_t v1) {
  const __m512 scale = _mm512_set1_ps(t.scale), one = _mm512_set1_ps(1.0f);
  const bool has_cap = t.softcap > 0.0f;
  for (int64_t v = v0; v < v1; ++v) {
    float* row = t.logits + v * t.rows;
    const float bias = t.bias_at(v);
    const __m512i here = _mm512_set1_epi32(static_cast<int32_t>(v));
    for (int64_t r = 0; r < t.rows; r += kRowBlock) {
      const __mmask16 mask = t.rows - r >= kRowBlock ? static_cast<__mmask16>(0xFFFF)
                                                     : static_cast<__mmask16>((1u << (t.rows - r)) - 1u);
      __m512 capped = _mm512_setzero_ps();
      const __m512 z = transformed_logit512(_mm512_maskz_loadu_ps(mask, row + r), bias, scale, t.softcap, capped);
      const __m512 row_scale = _mm512_maskz_loadu_ps(mask, in.row_scale + r);
      __m512 gradient = _mm512_mul_ps(exp512(_mm512_sub_ps(z, _mm512_maskz_loadu_ps(mask, in.lse + r))),
                                      _mm512_maskz_loadu_ps(mask, in.probability_scale + r));
      gradient = _mm512_sub_ps(gradient, _mm512_mul_ps(_mm512_set1_ps(in.uniform), row_scale));
      const __mmask16 is_label = _mm512_cmpeq_epi32_mask(_mm512_maskz_loadu_epi32(mask, labels + r), here);
      gradient =
          _mm512_mask_sub_ps(gradient, is_label, gradient, _mm512_mul_ps(_mm512_set1_ps(in.target_weight), row_scale));
      if (has_cap) gradient = _mm512_mul_ps(gradient, _mm512_sub_ps(one, _mm512_mul_ps(capped, capped)));
      _mm512_mask_storeu_ps(row + r, mask, _mm512_mul_ps(gradient, scale));
    }
  }
}
#endif

Tile make_tile(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& labels, int64_t start,
               double logit_scale, double softcap) {
  return {logits.data_ptr<float>(),
          bias.defined() ? bias.const_data_ptr<float>() : nullptr,
          labels.const_data_ptr<int64_t>(),
          start,
          logits.size(0),
          logits.size(1),
          static_cast<float>(logit_scale),
          static_cast<float>(softcap)};
}

}  // namespace

void cross_entropy_tile_forward_(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& labels, int64_t start, double logit_scale, double softcap,
                                 const at::Tensor& running_max, const at::Tensor& running_sum, const at::Tensor& target,
                                 const std::optional<at::Tensor>& logit_sum) {
  const at::Tensor sums = logit_sum.has_value() ? *logit_sum : at::Tensor();
  check_cross_entropy_tile_forward_args(logits, bias, labels, start, softcap, running_max, running_sum, target, sums);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "cross_entropy_tile_forward_: logits is on ", logits.device(),
                    " but the CPU kernel was called");
  if (logits.numel() == 0) return;
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias), labels_contiguous = labels.contiguous();
  const Tile t = make_tile(logits, bias_contiguous, labels_contiguous, start, logit_scale, softcap);
  const ForwardRows out{running_max.data_ptr<float>(), running_sum.data_ptr<float>(), target.data_ptr<float>(),
                        sums.defined() ? sums.data_ptr<float>() : nullptr};
  const int64_t blocks = (t.rows + kRowBlock - 1) / kRowBlock;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (kRowBlock * t.tile));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRowBlock, r1 = std::min(t.rows, r0 + kRowBlock);
#if defined(MEMENGINE_X86_SIMD)
      if (active_isa() == Isa::avx512) {
        forward_block_avx512(t, out, r0, static_cast<__mmask16>((1u << (r1 - r0)) - 1u));
        continue;
      }
#endif
      forward_rows_scalar(t, out, r0, r1);
    }
  });
}

void cross_entropy_tile_backward_(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& labels, int64_t start, double logit_scale, double softcap,
                                  const at::Tensor& lse, const at::Tensor& probability_scale,
                                  const at::Tensor& row_scale, double uniform, double target_weight) {
  check_cross_entropy_tile_backward_args(logits, bias, labels, start, softcap, lse, probability_scale, row_scale);
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "cross_entropy_tile_backward_: logits is on ", logits.device(),
                    " but the CPU kernel was called");
  if (logits.numel() == 0) return;
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias), labels_contiguous = labels.contiguous();
  const Tile t = make_tile(logits, bias_contiguous, labels_contiguous, start, logit_scale, softcap);
  const BackwardRows in{lse.const_data_ptr<float>(), probability_scale.const_data_ptr<float>(),
                        row_scale.const_data_ptr<float>(), static_cast<float>(uniform),
                        static_cast<float>(target_weight)};
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / t.rows);
#if defined(MEMENGINE_X86_SIMD)
  if (active_isa() == Isa::avx512) {
    std::vector<int32_t> label_index(static_cast<size_t>(t.rows));
    for (int64_t r = 0; r < t.rows; ++r) {
      label_index[static_cast<size_t>(r)] = static_cast<int32_t>(label_in_tile(t.labels[r], t.start, t.tile));
    }
    at::parallel_for(0, t.tile, grain,
                     [&](int64_t v0, int64_t v1) { backward_rows_avx512(t, in, label_index.data(), v0, v1); });
    return;
  }
#endif
  at::parallel_for(0, t.tile, grain, [&](int64_t v0, int64_t v1) { backward_rows_scalar(t, in, v0, v1); });
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) {
  m.impl("cross_entropy_tile_forward_", &cross_entropy_tile_forward_);
  m.impl("cross_entropy_tile_backward_", &cross_entropy_tile_backward_);
}

}  // namespace memengine::cpu
