// CPU entry point of bias_grad_accumulate_ (registered in bias_grad_accumulate.cpp; declared
// here for the C++ unit tests).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memengine::cpu {

void bias_grad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, double alpha,
                           const std::optional<at::Tensor>& alpha_tensor, bool overwrite);

}  // namespace memengine::cpu
