// A scalar argument of an op (alpha, scale): the Python float, unless the optional 0-dim
// float32 tensor is given. A tensor on the device is read by the kernel through
// `device_pointer` (no host synchronisation); a CPU tensor is read here, at no
// synchronisation cost. check_scalar_tensor (checks.h) validates the tensor first.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace memengine {

struct ScalarArgument {
  const float* device_pointer = nullptr;  // set only for a tensor on the GPU
  float value = 1.0f;                     // used when device_pointer is null
};

inline ScalarArgument resolve_scalar(double value, const std::optional<at::Tensor>& tensor) {
  if (!tensor.has_value() || !tensor->defined()) return {nullptr, static_cast<float>(value)};
  if (tensor->device().is_cpu()) return {nullptr, tensor->item<float>()};
  return {tensor->const_data_ptr<float>(), 1.0f};
}

// For CPU kernels, whose scalar tensors are always on the CPU.
inline float host_scalar(double value, const std::optional<at::Tensor>& tensor) {
  return resolve_scalar(value, tensor).value;
}

}  // namespace memengine
