// CPU entry points of grad_stats_ and clip_ (registered in grad_stats.cpp and clip.cpp;
// declared here for the C++ unit tests).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memengine::cpu {

at::Tensor grad_stats_(const at::Tensor& flat, double scale, const std::optional<at::Tensor>& scale_tensor);

void clip_(const at::Tensor& flat, const at::Tensor& stats, double max_norm);

}  // namespace memengine::cpu
