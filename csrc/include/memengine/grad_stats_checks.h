// Argument validation of grad_stats_ and clip_, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memengine {

inline void check_flat_buffer(const char* op, const at::Tensor& flat) {
  TORCH_CHECK_VALUE(flat.defined(), op, ": flat must be a tensor");
  TORCH_CHECK_VALUE(flat.scalar_type() == at::kFloat, op, ": flat must be float32 (the fp32 gradient buffer), got ",
                    flat.scalar_type());
  TORCH_CHECK_VALUE(flat.is_contiguous(), op,
                    ": flat must be contiguous (a GradBuffer's data is); pass flat.contiguous() and copy back");
}

inline void check_grad_stats_args(const at::Tensor& flat, const std::optional<at::Tensor>& scale_tensor) {
  check_flat_buffer("grad_stats_", flat);
  if (scale_tensor.has_value() && scale_tensor->defined()) {
    const at::Tensor& scale = *scale_tensor;
    TORCH_CHECK_VALUE(scale.dim() == 0 && scale.scalar_type() == at::kFloat,
                      "grad_stats_: scale must be a Python float or a 0-dim float32 tensor, got a ",
                      scale.scalar_type(), " tensor of shape ", scale.sizes());
    TORCH_CHECK_VALUE(scale.device() == flat.device() || scale.device().is_cpu(), "grad_stats_: scale is on ",
                      scale.device(), " but flat is on ", flat.device(), "; move scale to ", flat.device());
  }
}

inline void check_clip_args(const at::Tensor& flat, const at::Tensor& stats, double max_norm) {
  check_flat_buffer("clip_", flat);
  TORCH_CHECK_VALUE(stats.defined() && stats.scalar_type() == at::kFloat && stats.dim() == 1 && stats.size(0) == 2,
                    "clip_: stats must be the float32 tensor [2] returned by grad_stats_ (norm, non-finite count)");
  TORCH_CHECK_VALUE(stats.device() == flat.device(), "clip_: stats is on ", stats.device(), " but flat is on ",
                    flat.device());
  TORCH_CHECK_VALUE(max_norm > 0, "clip_: max_norm must be positive, got ", max_norm);
}

}  // namespace memengine
