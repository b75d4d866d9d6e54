// CUDA kernels of bias_grad_accumulate_: main_grad (+)= alpha * column sums of grad_output.
//
// Deterministic without atomics, with the CPU kernel's arithmetic: the rows are cut into
// bias_grad_chunk_count(rows) chunks (a function of the row count only); one thread per
// column and chunk adds groups of 8 rows in float32 and the group sums in double (adjacent
// threads read adjacent columns: coalesced); a second kernel adds the chunk sums in order and
// applies memengine::accumulate_value.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "memengine/accumulate.h"
#include "memengine/bias_grad_checks.h"
#include "memengine/scalar_argument.h"

namespace memengine::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kGroup = 8;

template <class Src>
__global__ void __launch_bounds__(kThreads) column_sums_kernel(const Src* g, int64_t rows, int64_t columns, int64_t ld,
                                                               int64_t rows_per_chunk, double* partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  if (c >= columns) return;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t end = min(first + rows_per_chunk, rows);
  double sum = 0.0;
  int64_t r = first;
  for (; r + kGroup <= end; r += kGroup) {
    float group = static_cast<float>(g[r * ld + c]);
#pragma unroll
    for (int64_t k = 1; k < kGroup; ++k) group += static_cast<float>(g[(r + k) * ld + c]);
    sum += static_cast<double>(group);
  }
  for (; r < end; ++r) sum += static_cast<double>(static_cast<float>(g[r * ld + c]));
  partial[chunk * columns + c] = sum;
}

template <bool Overwrite>
__global__ void __launch_bounds__(kThreads)
    apply_column_sums_kernel(float* main_grad, int64_t main_grad_stride, const double* partial, int64_t chunks,
                             int64_t columns, const float* alpha_ptr, float alpha_value) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= columns) return;
  double total = 0.0;
  for (int64_t k = 0; k < chunks; ++k) total += partial[k * columns + c];  // chunk order
  const float alpha = alpha_ptr != nullptr ? *alpha_ptr : alpha_value;
  float* out = main_grad + c * main_grad_stride;
  *out = accumulate_value<Overwrite>(*out, static_cast<float>(total), alpha);
}

}  // namespace

void bias_grad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, double alpha,
                           const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_bias_grad_args(main_grad, grad_output, alpha_tensor);
  TORCH_CHECK_VALUE(main_grad.is_cuda(), "bias_grad_accumulate_: main_grad is on ", main_grad.device(),
                    " but the CUDA kernel was called");
  const int64_t columns = main_grad.size(0);
  if (columns == 0) return;
  const c10::cuda::CUDAGuard guard(main_grad.device());
  const ScalarArgument a = resolve_scalar(alpha, alpha_tensor);
  at::Tensor g2 = grad_output.reshape({-1, columns});
  if (g2.stride(1) != 1 || g2.stride(0) < columns) g2 = g2.contiguous();
  const int64_t rows = g2.size(0);
  const int64_t chunks = bias_grad_chunk_count(rows);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  at::Tensor partial = at::zeros({chunks, columns}, main_grad.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto column_blocks = static_cast<unsigned>((columns + kThreads - 1) / kThreads);
  if (rows > 0) {
    const dim3 grid(column_blocks, static_cast<unsigned>(chunks));
    switch (g2.scalar_type()) {
      case at::kBFloat16:
        column_sums_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const c10::BFloat16*>(g2.const_data_ptr()), rows,
                                                          columns, g2.stride(0), rows_per_chunk,
                                                          partial.data_ptr<double>());
        break;
      case at::kHalf:
        column_sums_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const c10::Half*>(g2.const_data_ptr()), rows,
                                                          columns, g2.stride(0), rows_per_chunk,
                                                          partial.data_ptr<double>());
        break;
      default:
        column_sums_kernel<<<grid, kThreads, 0, stream>>>(g2.const_data_ptr<float>(), rows, columns, g2.stride(0),
                                                          rows_per_chunk, partial.data_ptr<double>());
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (overwrite) {
    apply_column_sums_kernel<true><<<column_blocks, kThreads, 0, stream>>>(
        main_grad.data_ptr<float>(), main_grad.stride(0), partial.const_data_ptr<double>(), chunks, columns,
        a.device_pointer, a.value);
  } else {
    apply_column_sums_kernel<false><<<column_blocks, kThreads, 0, stream>>>(
        main_grad.data_ptr<float>(), main_grad.stride(0), partial.const_data_ptr<double>(), chunks, columns,
        a.device_pointer, a.value);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) { m.impl("bias_grad_accumulate_", &bias_grad_accumulate_); }

}  // namespace memengine::cuda
