// Argument validation of bias_grad_accumulate_, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "memengine/checks.h"

namespace memengine {

inline void check_bias_grad_args(const at::Tensor& main_grad, const at::Tensor& grad_output,
                                 const std::optional<at::Tensor>& alpha_tensor) {
  constexpr const char* op = "bias_grad_accumulate_";
  TORCH_CHECK_VALUE(main_grad.defined() && grad_output.defined(), op, ": main_grad and grad_output must be tensors");
  TORCH_CHECK_VALUE(main_grad.scalar_type() == at::kFloat, op, ": main_grad must be float32, got ",
                    main_grad.scalar_type());
  TORCH_CHECK_VALUE(main_grad.dim() == 1, op, ": main_grad must be 1-D [out], got shape ", main_grad.sizes());
  TORCH_CHECK_VALUE(is_supported_source_dtype(grad_output.scalar_type()), op,
                    ": grad_output must be float32, bfloat16 or float16, got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.dim() >= 1 && grad_output.size(-1) == main_grad.size(0), op,
                    ": grad_output's last dimension must equal main_grad's size ", main_grad.size(0),
                    ", got grad_output of shape ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == main_grad.device(), op, ": grad_output is on ", grad_output.device(),
                    " but main_grad is on ", main_grad.device());
  if (main_grad.numel() > 0) {
    check_no_internal_overlap(op, main_grad, "main_grad");
    TORCH_CHECK_VALUE(grad_output.numel() == 0 || !share_bytes(main_grad, grad_output), op,
                      ": main_grad and grad_output overlap in memory; pass a copy of grad_output");
  }
  check_scalar_tensor(op, alpha_tensor, main_grad.device());
}

// Rows of the flattened [rows, out] grad_output summed by one partial sum. A function of the
// row count only, so results do not depend on the thread count or the device.
inline int64_t bias_grad_chunk_count(int64_t rows) {
  constexpr int64_t kRowsPerChunk = 256;
  constexpr int64_t kMaxChunks = 64;
  return std::max<int64_t>(1, std::min(kMaxChunks, (rows + kRowsPerChunk - 1) / kRowsPerChunk));
}

}  // namespace memengine
