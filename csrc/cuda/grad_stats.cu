// CUDA kernels of grad_stats_: flat <- flat * scale; [L2 norm of the finite values, non-finite count]
// (a norm beyond float32's range is +inf and counted as non-finite: finish_grad_stats).
//
// Deterministic without atomics: the number of partial blocks depends only on the size (not on
// the device), each block reduces its grid-stride share in a fixed tree, and one final block
// adds the partials in a fixed order. Squares are summed in double (memengine/grad_stats.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "memengine/grad_stats.h"
#include "memengine/grad_stats_checks.h"
#include "memengine/scalar_argument.h"

namespace memengine::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxPartials = 1024;
constexpr int64_t kElementsPerPartial = 1 << 14;

// Sums `value` over the block in a fixed order; the result is valid in thread 0.
template <class T>
__device__ T block_sum(T value, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : T(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  __syncthreads();
  return value;
}

__global__ void __launch_bounds__(kThreads)
    grad_stats_partial_kernel(float* x, int64_t n, const float* scale_ptr, float scale_value, bool scaled,
                              double* partial_squares, long long* partial_counts) {
  __shared__ double shared_squares[kThreads / 32];
  __shared__ long long shared_counts[kThreads / 32];
  const float scale = scale_ptr != nullptr ? *scale_ptr : scale_value;
  double squares = 0.0;
  long long nonfinite = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    float v = x[i];
    if (scaled) {
      v = multiply(v, scale);
      x[i] = v;
    }
    squares += square_if_finite(v);
    nonfinite += is_finite_value(v) ? 0 : 1;
  }
  squares = block_sum(squares, shared_squares);
  nonfinite = block_sum(nonfinite, shared_counts);
  if (threadIdx.x == 0) {
    partial_squares[blockIdx.x] = squares;
    partial_counts[blockIdx.x] = nonfinite;
  }
}

__global__ void __launch_bounds__(kThreads)
    grad_stats_final_kernel(const double* partial_squares, const long long* partial_counts, int partials, float* out) {
  __shared__ double shared_squares[kThreads / 32];
  __shared__ long long shared_counts[kThreads / 32];
  double squares = 0.0;
  long long nonfinite = 0;
  for (int i = threadIdx.x; i < partials; i += blockDim.x) {
    squares += partial_squares[i];
    nonfinite += partial_counts[i];
  }
  squares = block_sum(squares, shared_squares);
  nonfinite = block_sum(nonfinite, shared_counts);
  if (threadIdx.x == 0) finish_grad_stats(squares, nonfinite, out);
}

}  // namespace

at::Tensor grad_stats_(const at::Tensor& flat, double scale, const std::optional<at::Tensor>& scale_tensor) {
  check_grad_stats_args(flat, scale_tensor);
  TORCH_CHECK_VALUE(flat.is_cuda(), "grad_stats_: flat is on ", flat.device(), " but the CUDA kernel was called");
  const c10::cuda::CUDAGuard guard(flat.device());
  const ScalarArgument resolved = resolve_scalar(scale, scale_tensor);
  const float* scale_ptr = resolved.device_pointer;
  const float scale_value = resolved.value;
  const bool scaled = scale_ptr != nullptr || scale_value != 1.0f;
  const int64_t n = flat.numel();
  const int64_t partials =
      std::max<int64_t>(1, std::min(kMaxPartials, (n + kElementsPerPartial - 1) / kElementsPerPartial));
  at::Tensor partial_squares = at::empty({partials}, flat.options().dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({partials}, flat.options().dtype(at::kLong));
  at::Tensor out = at::empty({2}, flat.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  grad_stats_partial_kernel<<<static_cast<unsigned>(partials), kThreads, 0, stream>>>(
      n > 0 ? flat.data_ptr<float>() : nullptr, n, scale_ptr, scale_value, scaled, partial_squares.data_ptr<double>(),
      reinterpret_cast<long long*>(partial_counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_stats_final_kernel<<<1, kThreads, 0, stream>>>(
      partial_squares.const_data_ptr<double>(),
      reinterpret_cast<const long long*>(partial_counts.const_data_ptr<int64_t>()), static_cast<int>(partials),
      out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) { m.impl("grad_stats_", &grad_stats_); }

}  // namespace memengine::cuda
