// CPU entry points of accumulate_ / multi_accumulate_ (registered with the dispatcher in
// accumulate.cpp; declared here for the C++ unit tests).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memengine::cpu {

void accumulate_(const at::Tensor& dst, const at::Tensor& src, double alpha,
                 const std::optional<at::Tensor>& alpha_tensor, bool overwrite);

void multi_accumulate_(at::TensorList dsts, at::TensorList srcs, double alpha,
                       const std::optional<at::Tensor>& alpha_tensor, bool overwrite);

}  // namespace memengine::cpu
