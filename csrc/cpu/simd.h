// SIMD wrapper types for the CPU kernels, and run-time choice of the instruction set.
//
// The extension is compiled for the baseline x86-64 ISA so that one build runs on every
// machine; only the functions marked MEMENGINE_TARGET_AVX512 / MEMENGINE_TARGET_AVX2 use
// wider instructions, and they are called only after the CPU reported support for them.
// The wrappers are plain structs so that the shared functors in memengine/accumulate.h
// find multiply/multiply_add for them by argument-dependent lookup.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace memengine::cpu {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

const char* isa_name(Isa isa);
// Widest ISA this CPU and build support.
Isa best_supported_isa();
// ISA the kernels use: best_supported_isa(), lowered by MEMENGINE_CPU_ISA=scalar|avx2|avx512
// or by set_active_isa() (tests use it to cover every code path on one machine).
Isa active_isa();
// Throws ValueError if `name` is unknown or not supported here.
void set_active_isa(const char* name);

}  // namespace memengine::cpu

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MEMENGINE_X86_SIMD 1
#include <immintrin.h>

#define MEMENGINE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define MEMENGINE_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace memengine::cpu {

struct Avx512Floats {
  static constexpr int kWidth = 16;
  __m512 v;

  MEMENGINE_TARGET_AVX512 static Avx512Floats broadcast(float x) { return {_mm512_set1_ps(x)}; }
  MEMENGINE_TARGET_AVX512 static Avx512Floats load(const float* p) { return {_mm512_loadu_ps(p)}; }
  MEMENGINE_TARGET_AVX512 static Avx512Floats load(const c10::BFloat16* p) {
    // bfloat16 is the upper half of a float32: widen to 32 bits and shift into place.
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
  }
  MEMENGINE_TARGET_AVX512 static Avx512Floats load(const c10::Half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  MEMENGINE_TARGET_AVX512 void store(float* p) const { _mm512_storeu_ps(p, v); }
};

MEMENGINE_TARGET_AVX512 inline Avx512Floats multiply(Avx512Floats a, Avx512Floats b) {
  return {_mm512_mul_ps(a.v, b.v)};
}
MEMENGINE_TARGET_AVX512 inline Avx512Floats multiply_add(Avx512Floats a, Avx512Floats b, Avx512Floats c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}

struct Avx2Floats {
  static constexpr int kWidth = 8;
  __m256 v;

  MEMENGINE_TARGET_AVX2 static Avx2Floats broadcast(float x) { return {_mm256_set1_ps(x)}; }
  MEMENGINE_TARGET_AVX2 static Avx2Floats load(const float* p) { return {_mm256_loadu_ps(p)}; }
  MEMENGINE_TARGET_AVX2 static Avx2Floats load(const c10::BFloat16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))};
  }
  MEMENGINE_TARGET_AVX2 static Avx2Floats load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  MEMENGINE_TARGET_AVX2 void store(float* p) const { _mm256_storeu_ps(p, v); }
};

MEMENGINE_TARGET_AVX2 inline Avx2Floats multiply(Avx2Floats a, Avx2Floats b) { return {_mm256_mul_ps(a.v, b.v)}; }
MEMENGINE_TARGET_AVX2 inline Avx2Floats multiply_add(Avx2Floats a, Avx2Floats b, Avx2Floats c) {
  return {_mm256_fmadd_ps(a.v, b.v, c.v)};
}

}  // namespace memengine::cpu
#endif
