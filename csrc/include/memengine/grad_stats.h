// Per-element arithmetic of grad_stats_ and clip_, shared by every compiled backend.
//
// grad_stats_: x <- x * scale (one float32 multiply), then the squares of the finite scaled
// values are summed in double. A float32 squared is exact in double (24-bit significand ->
// 48 bits), so backends differ only in the order of the double additions, which each backend
// fixes (no atomics) so that the same input always gives the same bits.
// The norm is then rounded to float32 once (finish_grad_stats); a norm beyond float32's range
// counts as a non-finite value.
// clip_: x <- x * clip_coefficient(...) unless a non-finite value was counted or the norm is
// not finite.
#pragma once

#include <cfloat>
#include <cmath>

#include "memengine/accumulate.h"  // multiply
#include "memengine/macros.h"

namespace memengine {

// x - x is 0 for every finite x and NaN for NaN and +-inf.
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE bool is_finite_value(float x) { return x - x == 0.0f; }

MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE double square_if_finite(float x) {
  return is_finite_value(x) ? static_cast<double>(x) * static_cast<double>(x) : 0.0;
}

// grad_stats_'s result [norm, non-finite count] from the double sum of the finite values' squares
// and the count of non-finite values. A norm float32 cannot represent (sqrt > FLT_MAX, including
// norms just above it that a cast would round down to FLT_MAX) is +inf and counts as one more
// non-finite value, so that everything that skips the step on stats[1] > 0 (clip_, Engine.step)
// skips it: clipping by max_norm / inf = 0 would step with a zeroed gradient.
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE void finish_grad_stats(double sum_of_squares, long long nonfinite,
                                                                     float* result) {
  const double norm = sqrt(sum_of_squares);
  const bool unrepresentable = norm > static_cast<double>(FLT_MAX);
  result[0] = unrepresentable ? HUGE_VALF : static_cast<float>(norm);
  result[1] = static_cast<float>(nonfinite + (unrepresentable ? 1 : 0));
}

// The factor clip_ multiplies by: min(1, max_norm / (norm + 1e-6)), or 1 when the gradients
// hold a non-finite value or the norm is not finite (the step will be skipped; scaling would
// only spread the damage, and max_norm / inf = 0 would erase the gradient).
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float clip_coefficient(float norm, float nonfinite_count,
                                                                     float max_norm) {
  if (nonfinite_count > 0.0f || !is_finite_value(norm)) {
    return 1.0f;
  }
  const float coefficient = max_norm / (norm + 1e-6f);
  return coefficient < 1.0f ? coefficient : 1.0f;
}

}  // namespace memengine
