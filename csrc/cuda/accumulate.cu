// CUDA kernels of accumulate_ / multi_accumulate_:  dst <- (overwrite ? 0 : dst) + alpha * float(src).
//
// One grid-stride device routine serves both ops: it moves 16 bytes of src per thread and
// step (128-bit loads; 8 bf16/fp16 or 4 fp32 elements) when both pointers are aligned for it
// and falls back to one element at a time otherwise. Indexing is 64-bit. The multi-tensor
// form batches up to kMaxTensorsPerLaunch tensors per launch, one block per chunk of a
// tensor. The arithmetic is memengine::accumulate_value, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>

#include "memengine/accumulate.h"
#include "memengine/checks.h"
#include "memengine/scalar_argument.h"

namespace memengine::cuda {
namespace {

constexpr const char* kOp = "accumulate_";
constexpr const char* kMultiOp = "multi_accumulate_";
constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;       // elements per block in the multi-tensor kernel
constexpr int kMaxTensorsPerLaunch = 48;  // keeps the kernel arguments well under 4 KiB

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class Src, bool Overwrite>
__device__ __forceinline__ void accumulate_elements(float* __restrict__ dst, const Src* __restrict__ src, int64_t n,
                                                    float alpha, int64_t first, int64_t step) {
  constexpr int N = 16 / sizeof(Src);
  const bool aligned = reinterpret_cast<uintptr_t>(dst) % sizeof(Pack<float, N>) == 0 &&
                       reinterpret_cast<uintptr_t>(src) % sizeof(Pack<Src, N>) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t packs = n / N;
    for (int64_t p = first; p < packs; p += step) {
      const Pack<Src, N> s = reinterpret_cast<const Pack<Src, N>*>(src)[p];
      Pack<float, N> d = reinterpret_cast<const Pack<float, N>*>(dst)[p];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        d.v[k] = accumulate_value<Overwrite>(d.v[k], static_cast<float>(s.v[k]), alpha);
      }
      reinterpret_cast<Pack<float, N>*>(dst)[p] = d;
    }
    done = packs * N;
  }
  for (int64_t i = done + first; i < n; i += step) {
    dst[i] = accumulate_value<Overwrite>(dst[i], static_cast<float>(src[i]), alpha);
  }
}

__device__ __forceinline__ float read_alpha(const float* alpha_ptr, float alpha_value) {
  return alpha_ptr != nullptr ? *alpha_ptr : alpha_value;
}

template <class Src, bool Overwrite>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(float* dst, const Src* src, int64_t n, const float* alpha_ptr, float alpha_value) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  accumulate_elements<Src, Overwrite>(dst, src, n, read_alpha(alpha_ptr, alpha_value), first, step);
}

struct TensorBatch {
  float* dst[kMaxTensorsPerLaunch];
  const void* src[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int32_t first_chunk[kMaxTensorsPerLaunch + 1];  // prefix sums of the chunk counts
  int32_t count;
};

template <class Src, bool Overwrite>
__global__ void __launch_bounds__(kThreads)
    multi_accumulate_kernel(const __grid_constant__ TensorBatch batch, const float* alpha_ptr, float alpha_value) {
  const int32_t chunk = blockIdx.x;
  int lo = 0, hi = batch.count;  // find t with first_chunk[t] <= chunk < first_chunk[t + 1]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (batch.first_chunk[mid] <= chunk)
      lo = mid;
    else
      hi = mid;
  }
  const int64_t begin = static_cast<int64_t>(chunk - batch.first_chunk[lo]) * kChunk;
  const int64_t n = min(kChunk, batch.numel[lo] - begin);
  accumulate_elements<Src, Overwrite>(batch.dst[lo] + begin, static_cast<const Src*>(batch.src[lo]) + begin, n,
                                      read_alpha(alpha_ptr, alpha_value), threadIdx.x, blockDim.x);
}

// Calls fn(Src{}, std::bool_constant<Overwrite>{}) with the compile-time types of the call.
template <class Fn>
void dispatch(at::ScalarType src_dtype, bool overwrite, Fn&& fn) {
  auto with_src = [&](auto src_tag) {
    if (overwrite)
      fn(src_tag, std::true_type{});
    else
      fn(src_tag, std::false_type{});
  };
  switch (src_dtype) {
    case at::kBFloat16:
      with_src(c10::BFloat16{});
      break;
    case at::kHalf:
      with_src(c10::Half{});
      break;
    default:
      with_src(float{});
      break;
  }
}

using Alpha = ScalarArgument;

Alpha resolve_alpha(const char* op, double alpha, const std::optional<at::Tensor>& alpha_tensor,
                    const at::Device& device) {
  check_scalar_tensor(op, alpha_tensor, device);
  return resolve_scalar(alpha, alpha_tensor);
}

// A pair the kernels can treat as two flat arrays: dense, and both laid out the same way.
bool flat_compatible(const at::Tensor& dst, const at::Tensor& src) {
  return (dst.is_contiguous() && src.is_contiguous()) ||
         (dst.is_non_overlapping_and_dense() && dst.strides() == src.strides());
}

void launch_flat(const at::Tensor& dst, const at::Tensor& src, const Alpha& alpha, bool overwrite) {
  const int64_t n = dst.numel();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t elements_per_block = kThreads * 16;
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  const auto blocks = static_cast<unsigned>(std::min((n + elements_per_block - 1) / elements_per_block, max_blocks));
  dispatch(src.scalar_type(), overwrite, [&](auto src_tag, auto overwrite_tag) {
    using Src = decltype(src_tag);
    accumulate_kernel<Src, decltype(overwrite_tag)::value><<<blocks, kThreads, 0, stream>>>(
        dst.data_ptr<float>(), static_cast<const Src*>(src.const_data_ptr()), n, alpha.device_pointer, alpha.value);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Strided operands are handled through dense temporaries (documented in the README).
void accumulate_checked(const at::Tensor& dst, const at::Tensor& src, const Alpha& alpha, bool overwrite) {
  if (dst.numel() == 0) return;
  if (flat_compatible(dst, src)) {
    launch_flat(dst, src, alpha, overwrite);
    return;
  }
  const at::Tensor dense_dst = dst.contiguous();
  launch_flat(dense_dst, src.contiguous(), alpha, overwrite);
  if (!dense_dst.is_same(dst)) dst.copy_(dense_dst);
}

void launch_batch(TensorBatch& batch, at::ScalarType src_dtype, const Alpha& alpha, bool overwrite) {
  if (batch.count == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto blocks = static_cast<unsigned>(batch.first_chunk[batch.count]);
  dispatch(src_dtype, overwrite, [&](auto src_tag, auto overwrite_tag) {
    multi_accumulate_kernel<decltype(src_tag), decltype(overwrite_tag)::value>
        <<<blocks, kThreads, 0, stream>>>(batch, alpha.device_pointer, alpha.value);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  batch.count = 0;
}

void check_cuda(const char* op, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " is on ", t.device(), " but the CUDA kernel was called");
}

}  // namespace

void accumulate_(const at::Tensor& dst, const at::Tensor& src, double alpha,
                 const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_accumulate_pair(kOp, dst, src, "dst", "src");
  check_cuda(kOp, dst, "dst");
  const c10::cuda::CUDAGuard guard(dst.device());
  accumulate_checked(dst, src, resolve_alpha(kOp, alpha, alpha_tensor, dst.device()), overwrite);
}

void multi_accumulate_(at::TensorList dsts, at::TensorList srcs, double alpha,
                       const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  TORCH_CHECK_VALUE(dsts.size() == srcs.size(), kMultiOp, ": dsts has ", dsts.size(), " tensors but srcs has ",
                    srcs.size(), "; pass one source per destination");
  if (dsts.empty()) return;
  for (size_t i = 0; i < dsts.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    check_accumulate_pair(kMultiOp, dsts[i], srcs[i], "dsts" + index, "srcs" + index);
    check_cuda(kMultiOp, dsts[i], "dsts" + index);
    TORCH_CHECK_VALUE(dsts[i].device() == dsts[0].device(), kMultiOp, ": dsts", index, " is on ", dsts[i].device(),
                      " but dsts[0] is on ", dsts[0].device(), "; one call handles one device");
  }
  check_multi_disjoint(kMultiOp, dsts, srcs);
  const c10::cuda::CUDAGuard guard(dsts[0].device());
  const Alpha a = resolve_alpha(kMultiOp, alpha, alpha_tensor, dsts[0].device());
  // One batch per source dtype; pairs that are not flat arrays take the single-tensor path.
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    TensorBatch batch{};
    for (size_t i = 0; i < dsts.size(); ++i) {
      const at::Tensor& dst = dsts[i];
      const at::Tensor& src = srcs[i];
      if (src.scalar_type() != dtype || dst.numel() == 0) continue;
      if (!flat_compatible(dst, src)) {
        accumulate_checked(dst, src, a, overwrite);
        continue;
      }
      const int64_t chunks = (dst.numel() + kChunk - 1) / kChunk;
      TORCH_CHECK_VALUE(chunks < std::numeric_limits<int32_t>::max(), kMultiOp, ": dsts[", i, "] has ", dst.numel(),
                        " elements, more than one launch can cover; split it");
      if (batch.count == kMaxTensorsPerLaunch ||
          batch.first_chunk[batch.count] + chunks > std::numeric_limits<int32_t>::max()) {
        launch_batch(batch, dtype, a, overwrite);
      }
      batch.dst[batch.count] = dst.data_ptr<float>();
      batch.src[batch.count] = src.const_data_ptr();
      batch.numel[batch.count] = dst.numel();
      batch.first_chunk[batch.count + 1] = static_cast<int32_t>(batch.first_chunk[batch.count] + chunks);
      ++batch.count;
    }
    launch_batch(batch, dtype, a, overwrite);
  }
}

TORCH_LIBRARY_IMPL(memengine, CUDA, m) {
  m.impl("accumulate_", &accumulate_);
  m.impl("multi_accumulate_", &multi_accumulate_);
}

}  // namespace memengine::cuda
