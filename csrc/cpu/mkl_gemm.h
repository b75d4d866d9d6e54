// MKL's mixed-precision GEMMs (bf16 x bf16 -> fp32 and fp16 x fp16 -> fp32), found at run time.
//
// The x86 builds of PyTorch link MKL statically into libtorch_cpu.so and export
// cblas_gemm_bf16bf16f32 and cblas_gemm_f16f16f32 (32-bit MKL_INT). They are looked up with
// dlsym, never linked, so the extension still loads on builds without MKL (aarch64), where
// mkl_gemm_available() is false.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "gemm_operand.h"

namespace memengine::cpu {

bool mkl_gemm_available(bool half);

// C[m, n] (row stride ldc) <- (overwrite ? 0 : C) + alpha * sum_t A[t, m] * B[t, n], with A and B
// [k, m] and [k, n] operands in either layout (GemmOperand). Sizes above MKL's 32-bit limits are split
// into several calls. Returns false (and does nothing) when MKL is unavailable or a row stride
// does not fit in 32 bits.
template <class Src>
bool mkl_gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, GemmOperand<Src> a, GemmOperand<Src> b, bool overwrite,
                 float* c, int64_t ldc);

}  // namespace memengine::cpu
