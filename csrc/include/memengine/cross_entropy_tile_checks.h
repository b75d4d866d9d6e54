// Argument validation of cross_entropy_tile_forward_ and cross_entropy_tile_backward_, shared by the CPU and
// CUDA entry points (memengine/ops/validation.py: check_cross_entropy_tile_args words them the same way).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "memengine/checks.h"

namespace memengine {

// per_row: (name, tensor or undefined) of the float32 [rows] tensors the op reads or writes besides logits.
inline void check_cross_entropy_tile_args(const char* op, const at::Tensor& logits,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                          int64_t start, double softcap,
                                          const std::vector<std::pair<const char*, at::Tensor>>& per_row) {
  TORCH_CHECK_VALUE(logits.defined() && labels.defined(), op, ": logits and labels must be tensors");
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat && logits.dim() == 2, op,
                    ": logits must be a float32 [tile, rows] tensor, got ", logits.scalar_type(), " of shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.is_contiguous(), op,
                    ": logits must be contiguous (the kernel rewrites it in place); pass logits.contiguous()");
  const int64_t tile = logits.size(0), rows = logits.size(1);
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.dim() == 1 && labels.size(0) == rows, op,
                    ": labels must be int64 [rows] = [", rows, "], got ", labels.scalar_type(), " of shape ",
                    labels.sizes());
  TORCH_CHECK_VALUE(start >= 0, op, ": start (the tile's first vocabulary entry) must be non-negative, got ", start);
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be positive, or 0 for no cap, got ",
                    softcap);
  TORCH_CHECK_VALUE(logits.device() == labels.device(), op, ": labels is on ", labels.device(), " but logits is on ",
                    logits.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == tile, op,
                      ": bias must be float32 [tile] = [", tile, "], got ", bias->scalar_type(), " of shape ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == logits.device(), op, ": bias is on ", bias->device(), " but logits is on ",
                      logits.device());
  }
  for (const auto& [name, t] : per_row) {
    if (!t.defined()) continue;
    TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", name, " is on ", t.device(), " but logits is on ",
                      logits.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), op,
                      ": ", name, " must be a contiguous float32 [rows] = [", rows, "] tensor, got ", t.scalar_type(),
                      " of shape ", t.sizes());
    TORCH_CHECK_VALUE(logits.numel() == 0 || t.numel() == 0 || !share_bytes(logits, t), op, ": logits and ", name,
                      " overlap in memory; pass separate tensors");
  }
}

// The checks of each op's arguments, as both the CPU and the CUDA entry points take them.
inline void check_cross_entropy_tile_forward_args(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                  const at::Tensor& labels, int64_t start, double softcap,
                                                  const at::Tensor& running_max, const at::Tensor& running_sum,
                                                  const at::Tensor& target, const at::Tensor& logit_sum) {
  check_cross_entropy_tile_args(
      "cross_entropy_tile_forward_", logits, bias, labels, start, softcap,
      {{"running_max", running_max}, {"running_sum", running_sum}, {"target", target}, {"logit_sum", logit_sum}});
}

inline void check_cross_entropy_tile_backward_args(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& labels, int64_t start, double softcap,
                                                   const at::Tensor& lse, const at::Tensor& probability_scale,
                                                   const at::Tensor& row_scale) {
  check_cross_entropy_tile_args("cross_entropy_tile_backward_", logits, bias, labels, start, softcap,
                                {{"lse", lse}, {"probability_scale", probability_scale}, {"row_scale", row_scale}});
}

// An optional tensor argument made contiguous, or an undefined tensor for None.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

}  // namespace memengine
