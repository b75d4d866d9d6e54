// Per-element arithmetic of accumulate_ / multi_accumulate_, shared by every compiled backend.
//
//   dst <- (overwrite ? 0 : dst) + alpha * float(src)
//
// The accumulating form is one fused multiply-add (a single rounding), the overwriting form
// one multiply. The CPU kernels instantiate these templates for `float` and for SIMD wrapper
// types (csrc/cpu/simd.h); the CUDA kernels for `float`. The CPU tests therefore check the
// exact arithmetic the GPU runs: with alpha == 1 the product is exact, so every backend is
// bit-identical to PyTorch's `dst.add_(src)`.
#pragma once

#include <cmath>

#include "memengine/macros.h"

namespace memengine {

MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float multiply(float a, float b) { return a * b; }

// `Value` is float or a SIMD wrapper that provides multiply/multiply_add overloads found by ADL.
template <bool Overwrite, class Value>
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE Value accumulate_value(Value dst, Value src, Value alpha) {
  if constexpr (Overwrite) {
    (void)dst;
    return multiply(alpha, src);
  } else {
    return multiply_add(alpha, src, dst);
  }
}

}  // namespace memengine
