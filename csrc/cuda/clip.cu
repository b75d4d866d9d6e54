// CUDA kernel of clip_: every thread computes the factor from `stats` on the device (no host
// synchronisation) and returns at once when it is 1.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "memengine/grad_stats.h"
#include "memengine/grad_stats_checks.h"

namespace memengine::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) clip_kernel(float* x, int64_t n, const float* stats, float max_norm) {
  const float coefficient = clip_coefficient(stats[0], stats[1], max_norm);
  if (coefficient == 1.0f) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    x[i] = multiply(x[i], coefficient);
  }
}

}  // namespace

void clip_(const at::Tensor& flat, const at::Tensor& stats, double max_norm) {
  check_clip_args(flat, stats, max_norm);
  TORCH_CHECK_VALUE(flat.is_cuda(), "clip_: flat is on ", flat.device(), " but the CUDA kernel was called");
  if (flat.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  const at::Tensor stats_contiguous = stats.contiguous();
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  const auto blocks = static_cast<unsigned>(std::min((flat.numel() + kThreads - 1) / kThreads, max_blocks));
  clip_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      flat.data_ptr<float>(), flat.numel(), stats_contiguous.const_data_ptr<float>(), static_cast<float>(max_norm));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) { m.impl("clip_", &clip_); }

}  // namespace memengine::cuda
