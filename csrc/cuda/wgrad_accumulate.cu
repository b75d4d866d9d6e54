// CUDA implementation of wgrad_accumulate_: main_grad (+)= alpha * grad_output^T @ input.
//
// The weight gradient is a GEMM, and cuBLAS runs it better than a kernel of ours would: one
// cublasGemmEx per chunk of tokens reads bf16/fp16/fp32 operands, multiplies and sums in fp32
// (CUBLAS_COMPUTE_32F, with the handle's math mode held at CUBLAS_DEFAULT_MATH during the call
// so that PyTorch's allow_tf32 cannot turn fp32 inputs into TF32) and adds the product into the
// fp32 buffer through beta, so the product is never rounded to the input dtype and no [out, in]
// temporary is made. beta = 0 when overwriting: cuBLAS then does not read main_grad (NaN in it
// does not survive). cuBLAS is column-major: row-major main_grad [out, in] with row stride ldc
// is column-major C^T [in, out], so C^T = X * G^T with X = input as column-major [in, tokens]
// and G = grad_output as column-major [out, tokens], both views of the caller's tensors
// (as_token_matrix copies only when the leading dimensions cannot be flattened).
//
// A device alpha_tensor is never read on the host (no synchronisation, CUDA-graph safe): alpha
// and beta then come from a 3-float device tensor [alpha, beta, 1] under
// CUBLAS_POINTER_MODE_DEVICE. cuBLAS takes int sizes: the tokens are cut into chunks of at most
// 2^30 (beta = 1 after the first); out and in never need cutting, since they are bounded by
// leading dimensions, which must fit in an int (checked, with a clear error otherwise).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>

#include "memengine/scalar_argument.h"
#include "memengine/wgrad_checks.h"

namespace memengine::cuda {
namespace {

constexpr int64_t kMaxTokensPerCall = int64_t{1} << 30;

// Sets the handle's pointer and math modes for this op and restores the caller's on exit, also
// when a check throws.
class BlasModeGuard {
 public:
  BlasModeGuard(cublasHandle_t handle, cublasPointerMode_t pointer_mode) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle_, &pointer_mode_));
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &math_mode_));
    TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle_, pointer_mode));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
  }
  ~BlasModeGuard() {
    cublasSetPointerMode(handle_, pointer_mode_);
    cublasSetMathMode(handle_, math_mode_);
  }
  BlasModeGuard(const BlasModeGuard&) = delete;
  BlasModeGuard& operator=(const BlasModeGuard&) = delete;

 private:
  cublasHandle_t handle_;
  cublasPointerMode_t pointer_mode_ = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode_ = CUBLAS_DEFAULT_MATH;
};

cudaDataType_t blas_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kHalf:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

// Leading dimension of a [rows, columns] matrix with unit column stride, as cuBLAS's int. A
// single row's stride is never used: the column count then serves.
int leading_dimension(const at::Tensor& m, const char* name) {
  const int64_t ld = m.size(0) == 1 ? m.size(1) : m.stride(0);
  TORCH_CHECK_VALUE(ld <= INT_MAX, "wgrad_accumulate_: ", name, " has a row stride of ", ld,
                    " elements, more than cuBLAS's limit of ", INT_MAX,
                    "; rows this long (or this far apart) are not supported");
  return static_cast<int>(ld);
}

}  // namespace

void wgrad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                       double alpha, const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_wgrad_args(main_grad, grad_output, input, alpha_tensor);
  TORCH_CHECK_VALUE(main_grad.is_cuda(), "wgrad_accumulate_: main_grad is on ", main_grad.device(),
                    " but the CUDA kernel was called");
  const c10::cuda::CUDAGuard guard(main_grad.device());
  if (main_grad.numel() == 0) return;
  const int64_t tokens = token_count(input);
  if (tokens == 0) {
    if (overwrite) main_grad.zero_();
    return;
  }
  const at::Tensor g2 = as_token_matrix(grad_output);  // [tokens, out]
  const at::Tensor x2 = as_token_matrix(input);        // [tokens, in]
  const int ldg = leading_dimension(g2, "grad_output");
  const int ldx = leading_dimension(x2, "input");
  const int ldc = leading_dimension(main_grad, "main_grad");
  const int m = static_cast<int>(main_grad.size(1));  // <= ldx: fits
  const int n = static_cast<int>(main_grad.size(0));  // <= ldg: fits
  const cudaDataType_t type = blas_type(x2.scalar_type());

  // Scalars: host floats, or device floats [alpha, beta, 1] when alpha_tensor lives on the GPU.
  const ScalarArgument resolved = resolve_scalar(alpha, alpha_tensor);
  const bool device_alpha = resolved.device_pointer != nullptr;
  const float host_scalars[3] = {resolved.value, overwrite ? 0.0f : 1.0f, 1.0f};
  at::Tensor device_scalars;
  const float* scalars = host_scalars;
  if (device_alpha) {
    device_scalars = at::ones({3}, main_grad.options());
    device_scalars.select(0, 0).copy_(*alpha_tensor);
    if (overwrite) device_scalars.select(0, 1).zero_();
    scalars = device_scalars.const_data_ptr<float>();
  }

  const cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // binds the current stream
  const BlasModeGuard modes(handle, device_alpha ? CUBLAS_POINTER_MODE_DEVICE : CUBLAS_POINTER_MODE_HOST);
  const auto* x = static_cast<const char*>(x2.const_data_ptr());
  const auto* g = static_cast<const char*>(g2.const_data_ptr());
  const int64_t x_row_bytes = x2.stride(0) * x2.element_size();
  const int64_t g_row_bytes = g2.stride(0) * g2.element_size();
  float* c = main_grad.data_ptr<float>();
  for (int64_t first = 0; first < tokens; first += kMaxTokensPerCall) {
    const int k = static_cast<int>(std::min(kMaxTokensPerCall, tokens - first));
    const float* beta = first == 0 ? scalars + 1 : scalars + 2;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, scalars, x + first * x_row_bytes, type,
                                      ldx, g + first * g_row_bytes, type, ldg, beta, c, CUDA_R_32F, ldc,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) { m.impl("wgrad_accumulate_", &wgrad_accumulate_); }

}  // namespace memengine::cuda
