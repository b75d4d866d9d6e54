// Argument validation of wgrad_accumulate_, shared by the CPU and CUDA entry points (worded like
// check_wgrad_args in memengine/_validation.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "memengine/checks.h"

namespace memengine {

// Product of all dimensions but the last: the token count of a [..., features] tensor.
inline int64_t token_count(const at::Tensor& t) {
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) tokens *= t.size(d);
  return tokens;
}

inline void check_wgrad_args(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                             const std::optional<at::Tensor>& alpha_tensor) {
  constexpr const char* op = "wgrad_accumulate_";
  TORCH_CHECK_VALUE(main_grad.defined() && grad_output.defined() && input.defined(), op,
                    ": main_grad, grad_output and input must be tensors");
  TORCH_CHECK_VALUE(main_grad.scalar_type() == at::kFloat, op,
                    ": main_grad must be float32 (the fp32 gradient buffer), got ", main_grad.scalar_type());
  TORCH_CHECK_VALUE(main_grad.dim() == 2, op, ": main_grad must be 2-D [out, in], got shape ", main_grad.sizes());
  TORCH_CHECK_VALUE(is_supported_source_dtype(grad_output.scalar_type()), op,
                    ": grad_output must be float32, bfloat16 or float16, got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(is_supported_source_dtype(input.scalar_type()), op,
                    ": input must be float32, bfloat16 or float16, got ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output is ",
                    grad_output.scalar_type(), " but input is ", input.scalar_type(),
                    "; both must have the same dtype (cast one of them, e.g. input.to(grad_output.dtype))");
  const int64_t out_features = main_grad.size(0), in_features = main_grad.size(1);
  TORCH_CHECK_VALUE(grad_output.dim() >= 1 && grad_output.size(-1) == out_features, op,
                    ": grad_output's last dimension must equal main_grad.shape[0] = ", out_features,
                    ", got grad_output of shape ", grad_output.sizes());
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == in_features, op,
                    ": input's last dimension must equal main_grad.shape[1] = ", in_features, ", got input of shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(token_count(grad_output) == token_count(input), op, ": grad_output (shape ", grad_output.sizes(),
                    ") and input (shape ", input.sizes(),
                    ") must hold the same number of tokens (the product of all dimensions but the last)");
  TORCH_CHECK_VALUE(grad_output.device() == main_grad.device(), op, ": grad_output is on ", grad_output.device(),
                    " but main_grad is on ", main_grad.device());
  TORCH_CHECK_VALUE(input.device() == main_grad.device(), op, ": input is on ", input.device(), " but main_grad is on ",
                    main_grad.device());
  TORCH_CHECK_VALUE(main_grad.numel() == 0 || (main_grad.stride(1) == 1 && main_grad.stride(0) >= in_features), op,
                    ": main_grad must be a row-major matrix (strides (>= ", in_features, ", 1)), got strides ",
                    main_grad.strides(), "; pass a contiguous buffer or a row/column slice of one");
  if (main_grad.numel() > 0) {
    TORCH_CHECK_VALUE(grad_output.numel() == 0 || !share_bytes(main_grad, grad_output), op,
                      ": main_grad and grad_output overlap in memory; pass a copy of grad_output");
    TORCH_CHECK_VALUE(input.numel() == 0 || !share_bytes(main_grad, input), op,
                      ": main_grad and input overlap in memory; pass a copy of input");
  }
  check_scalar_tensor(op, alpha_tensor, main_grad.device());
}

// True if a [tokens, features] matrix is row-major: unit stride along features, rows apart.
inline bool is_row_major(const at::Tensor& m) {
  return m.size(1) == 0 || (m.stride(1) == 1 && m.stride(0) >= m.size(1));
}

// True if a [tokens, features] matrix is the transpose of a row-major [features, tokens] one (a .t() view): a
// token's features lie stride(1) apart, and a feature's tokens side by side.
inline bool is_token_contiguous(const at::Tensor& m) {
  return m.dim() == 2 && m.size(1) > 1 && m.stride(0) == 1 && m.stride(1) >= m.size(0);
}

// [tokens, features] view of a [..., features] tensor with unit stride along features, made
// without a copy when the leading dimensions can be flattened (a copy only otherwise). With
// keep_token_contiguous, a 2-D .t() view of a row-major matrix is also returned as it is (for
// kernels that read both layouts).
inline at::Tensor as_token_matrix(const at::Tensor& t, bool keep_token_contiguous = false) {
  if (keep_token_contiguous && is_token_contiguous(t) && !is_row_major(t)) return t;
  at::Tensor m = t.reshape({-1, t.size(-1)});
  if (!is_row_major(m)) m = m.contiguous();
  return m;
}

}  // namespace memengine
