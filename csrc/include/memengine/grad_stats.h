// Per-element arithmetic of grad_stats_ and clip_, shared by every compiled backend.
//
// grad_stats_: x <- x * scale (one float32 multiply), then the squares of the finite scaled
// values are summed in double. A float32 squared is exact in double (24-bit significand ->
// 48 bits), so backends differ only in the order of the double additions, which each backend
// fixes (no atomics) so that the same input always gives the same bits.
// clip_: x <- x * clip_coefficient(...) unless a non-finite value was counted.
#pragma once

#include "memengine/accumulate.h"  // multiply
#include "memengine/macros.h"

namespace memengine {

// x - x is 0 for every finite x and NaN for NaN and +-inf.
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE bool is_finite_value(float x) { return x - x == 0.0f; }

MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE double square_if_finite(float x) {
  return is_finite_value(x) ? static_cast<double>(x) * static_cast<double>(x) : 0.0;
}

// The factor clip_ multiplies by: min(1, max_norm / (norm + 1e-6)), or 1 when the gradients
// hold a non-finite value (the step will be skipped; scaling would only spread the damage).
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float clip_coefficient(float norm, float nonfinite_count,
                                                                     float max_norm) {
  if (nonfinite_count > 0.0f) {
    return 1.0f;
  }
  const float coefficient = max_norm / (norm + 1e-6f);
  return coefficient < 1.0f ? coefficient : 1.0f;
}

}  // namespace memengine
