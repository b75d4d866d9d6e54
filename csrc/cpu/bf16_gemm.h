// memengine's own bf16 x bf16 -> fp32 GEMM for CPUs with AVX512-BF16 (vdpbf16ps), used where
// MKL has no fast bf16 path (on a 2-core AMD EPYC with AVX512-BF16, MKL's cblas_gemm_bf16bf16f32
// took 1.5x to 2.6x this kernel's time; see benchmarks/bench_wgrad_accumulate.py).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "gemm_operand.h"

namespace memengine::cpu {

// True if this CPU executes AVX512-BF16 instructions (and the OS saves AVX-512 state).
bool bf16_gemm_supported();

// C[m, n] (row stride ldc) <- (overwrite ? 0 : C) + alpha * sum_t A[t, m] * B[t, n], with A and B
// [k, m] and [k, n] operands in either layout (GemmOperand). Products are exact in fp32 and summed in
// fp32 (round to nearest even). Like every AVX512-BF16 instruction, bf16 subnormal inputs are
// read as zero. Scratch memory: at most 16 MiB for packed operands unless m + n > 2^18.
void bf16_gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, GemmOperand<c10::BFloat16> a,
                  GemmOperand<c10::BFloat16> b, bool overwrite, float* c, int64_t ldc);

}  // namespace memengine::cpu
