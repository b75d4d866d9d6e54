// CPU entry point of wgrad_accumulate_ (registered in wgrad_accumulate.cpp) and the choice of
// the GEMM that runs it for 16-bit inputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace memengine::cpu {

void wgrad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                       double alpha, const std::optional<at::Tensor>& alpha_tensor, bool overwrite);

// How bf16/fp16 inputs are multiplied (fp32 inputs always use PyTorch's fp32 addmm):
//   mkl          MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32 (found with dlsym)
//   avx512_bf16  memengine's own AVX512-BF16 kernel (bf16 only)
//   chunked      fp32 copies of bounded token chunks and PyTorch's addmm (oneDNN bf16 fast math
//                for bf16 inputs, which is exact for them; plain fp32 for fp16)
//   auto         mkl on CPUs with AMX-BF16, else avx512_bf16 where supported, else mkl if found,
//                else chunked (fp16: mkl if found, else chunked)
// Set with MEMENGINE_WGRAD_CPU or set_wgrad_path(); a path that cannot run here is an error.
void set_wgrad_path(const std::string& name);
// The path that runs inputs of `dtype` now ("fp32_addmm" for float32).
std::string wgrad_path(at::ScalarType dtype);

}  // namespace memengine::cpu
