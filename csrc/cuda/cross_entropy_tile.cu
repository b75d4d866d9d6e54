// CUDA kernels of cross_entropy_tile_forward_ and cross_entropy_tile_backward_, with the per-element math of
// memengine/cross_entropy_tile.h (the CPU kernel's scalar path runs the same functions). Logits are transposed,
// [tile, rows]: the 32 threads of a warp take 32 neighbouring tokens of one vocabulary entry, one coalesced
// 128-byte access.
//
// Forward: a block is 32 tokens x 8 lanes over the vocabulary; each thread transforms and reduces every 8th
// entry of its token (maximum, sum, the label's logit), the lanes are combined through shared memory in lane
// order (deterministic), then each thread sums exp(z - tile maximum) over its entries and lane 0 merges the
// tile into the token's running log-sum-exp. Backward: elementwise.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "memengine/cross_entropy_tile.h"
#include "memengine/cross_entropy_tile_checks.h"

namespace memengine::cuda {
namespace {

constexpr int kTokens = 32;
constexpr int kLanes = 8;
constexpr int kBackwardThreads = 256;
constexpr int64_t kMaxGridY = 65535;

__global__ void __launch_bounds__(kTokens* kLanes)
    forward_kernel(float* logits, const float* bias, const int64_t* labels, int64_t start, int64_t tile, int64_t rows,
                   float scale, float softcap, float* running_max, float* running_sum, float* target,
                   float* logit_sum) {
  __shared__ float partial[3][kLanes][kTokens];
  const int token = threadIdx.x, lane = threadIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kTokens + token;
  const bool active = r < rows;
  const int64_t label = active ? label_in_tile(labels[r], start, tile) : -1;
  float local_max = -INFINITY, label_logit = 0.0f, capped;
  double sum = 0.0;  // thousands of entries per thread: float partial sums in entry order lose too much
  if (active) {
    for (int64_t v = lane; v < tile; v += kLanes) {
      float& x = logits[v * rows + r];
      x = transformed_logit(x, bias == nullptr ? 0.0f : bias[v], scale, softcap, capped);
      local_max = fmaxf(local_max, x);
      sum += x;
      if (v == label) label_logit = x;
    }
  }
  partial[0][lane][token] = local_max;
  partial[1][lane][token] = static_cast<float>(sum);
  partial[2][lane][token] = label_logit;
  __syncthreads();
  float tile_max = -INFINITY;
  for (int k = 0; k < kLanes; ++k) tile_max = fmaxf(tile_max, partial[0][k][token]);
  double exp_sum = 0.0;
  if (active) {
    for (int64_t v = lane; v < tile; v += kLanes) exp_sum += expf(logits[v * rows + r] - tile_max);
  }
  __syncthreads();  // every lane has read partial[0]
  partial[0][lane][token] = static_cast<float>(exp_sum);
  __syncthreads();
  if (lane != 0 || !active) return;
  float tile_sum = 0.0f, logits_total = 0.0f, label_total = 0.0f;
  for (int k = 0; k < kLanes; ++k) {
    tile_sum += partial[0][k][token];
    logits_total += partial[1][k][token];
    label_total += partial[2][k][token];
  }
  if (label >= 0) target[r] += label_total;
  if (logit_sum != nullptr) logit_sum[r] += logits_total;
  merge_log_sum_exp(running_max[r], running_sum[r], tile_max, tile_sum);
}

__global__ void __launch_bounds__(kBackwardThreads)
    backward_kernel(float* logits, const float* bias, const int64_t* labels, int64_t start, int64_t tile, int64_t rows,
                    float scale, float softcap, const float* lse, const float* probability_scale,
                    const float* row_scale, float uniform, float target_weight) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kBackwardThreads + threadIdx.x;
  if (r >= rows) return;
  const int64_t label = label_in_tile(labels[r], start, tile);
  const bool has_cap = softcap > 0.0f;
  for (int64_t v = blockIdx.y; v < tile; v += gridDim.y) {
    float& x = logits[v * rows + r];
    float capped;
    const float z = transformed_logit(x, bias == nullptr ? 0.0f : bias[v], scale, softcap, capped);
    x = logit_gradient(z, capped, v == label, lse[r], probability_scale[r], row_scale[r], uniform, target_weight,
                       scale, has_cap);
  }
}

const float* pointer_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

}  // namespace

void cross_entropy_tile_forward_(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& labels, int64_t start, double logit_scale, double softcap,
                                 const at::Tensor& running_max, const at::Tensor& running_sum, const at::Tensor& target,
                                 const std::optional<at::Tensor>& logit_sum) {
  const at::Tensor sums = logit_sum.has_value() ? *logit_sum : at::Tensor();
  check_cross_entropy_tile_forward_args(logits, bias, labels, start, softcap, running_max, running_sum, target, sums);
  TORCH_CHECK_VALUE(logits.is_cuda(), "cross_entropy_tile_forward_: logits is on ", logits.device(),
                    " but the CUDA kernel was called");
  if (logits.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias), labels_contiguous = labels.contiguous();
  const int64_t tile = logits.size(0), rows = logits.size(1);
  const dim3 block(kTokens, kLanes);
  const auto blocks = static_cast<unsigned>((rows + kTokens - 1) / kTokens);
  forward_kernel<<<blocks, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), pointer_or_null(bias_contiguous), labels_contiguous.const_data_ptr<int64_t>(), start,
      tile, rows, static_cast<float>(logit_scale), static_cast<float>(softcap), running_max.data_ptr<float>(),
      running_sum.data_ptr<float>(), target.data_ptr<float>(), sums.defined() ? sums.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cross_entropy_tile_backward_(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& labels, int64_t start, double logit_scale, double softcap,
                                  const at::Tensor& lse, const at::Tensor& probability_scale,
                                  const at::Tensor& row_scale, double uniform, double target_weight) {
  check_cross_entropy_tile_backward_args(logits, bias, labels, start, softcap, lse, probability_scale, row_scale);
  TORCH_CHECK_VALUE(logits.is_cuda(), "cross_entropy_tile_backward_: logits is on ", logits.device(),
                    " but the CUDA kernel was called");
  if (logits.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias), labels_contiguous = labels.contiguous();
  const int64_t tile = logits.size(0), rows = logits.size(1);
  const dim3 grid(static_cast<unsigned>((rows + kBackwardThreads - 1) / kBackwardThreads),
                  static_cast<unsigned>(std::min(tile, kMaxGridY)));
  backward_kernel<<<grid, kBackwardThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<float>(), pointer_or_null(bias_contiguous), labels_contiguous.const_data_ptr<int64_t>(), start,
      tile, rows, static_cast<float>(logit_scale), static_cast<float>(softcap), lse.const_data_ptr<float>(),
      probability_scale.const_data_ptr<float>(), row_scale.const_data_ptr<float>(), static_cast<float>(uniform),
      static_cast<float>(target_weight));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) {
  m.impl("cross_entropy_tile_forward_", &cross_entropy_tile_forward_);
  m.impl("cross_entropy_tile_backward_", &cross_entropy_tile_backward_);
}

}  // namespace memengine::cuda
