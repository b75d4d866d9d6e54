// Argument validation of grad_stats_ and clip_, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "memengine/checks.h"

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
  check_scalar_tensor("grad_stats_", scale_tensor, flat.device(), "scale");
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
