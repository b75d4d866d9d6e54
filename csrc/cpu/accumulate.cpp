// CPU kernels of accumulate_ / multi_accumulate_:  dst <- (overwrite ? 0 : dst) + alpha * float(src).
//
// Contiguous pairs run a SIMD span kernel (AVX-512 or AVX2, chosen at run time) split across
// threads with at::parallel_for; anything strided goes through TensorIterator, whose inner
// loop reuses the span kernel whenever the innermost dimension is dense. All indexing is
// 64-bit. The arithmetic is memengine::accumulate_value, shared with the CUDA kernels.
#include "accumulate.h"

#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include "memengine/accumulate.h"
#include "memengine/checks.h"
#include "memengine/scalar_argument.h"
#include "simd.h"

namespace memengine::cpu {
namespace {

constexpr const char* kOp = "accumulate_";
constexpr const char* kMultiOp = "multi_accumulate_";
// Elements per task: large enough that a memory-bound task dwarfs the scheduling cost.
constexpr int64_t kGrainSize = 32768;

using SpanKernel = void (*)(float* dst, const void* src, int64_t n, float alpha);

template <class Src, bool Overwrite>
void accumulate_span_scalar(float* dst, const void* src_bytes, int64_t n, float alpha) {
  const Src* src = static_cast<const Src*>(src_bytes);
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = accumulate_value<Overwrite>(dst[i], static_cast<float>(src[i]), alpha);
  }
}

#if defined(MEMENGINE_X86_SIMD)
// Unrolled four vectors deep so that several loads are in flight; the op is memory bound.
template <class Vec, class Src, bool Overwrite>
MEMENGINE_ALWAYS_INLINE void accumulate_span_simd(float* dst, const Src* src, int64_t n, float alpha) {
  constexpr int W = Vec::kWidth;
  const Vec a = Vec::broadcast(alpha);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    for (int k = 0; k < 4; ++k) {
      const int64_t j = i + k * W;
      accumulate_value<Overwrite>(Vec::load(dst + j), Vec::load(src + j), a).store(dst + j);
    }
  }
  for (; i + W <= n; i += W) {
    accumulate_value<Overwrite>(Vec::load(dst + i), Vec::load(src + i), a).store(dst + i);
  }
  for (; i < n; ++i) {
    dst[i] = accumulate_value<Overwrite>(dst[i], static_cast<float>(src[i]), alpha);
  }
}

template <class Src, bool Overwrite>
MEMENGINE_TARGET_AVX512 void accumulate_span_avx512(float* dst, const void* src, int64_t n, float alpha) {
  accumulate_span_simd<Avx512Floats, Src, Overwrite>(dst, static_cast<const Src*>(src), n, alpha);
}

template <class Src, bool Overwrite>
MEMENGINE_TARGET_AVX2 void accumulate_span_avx2(float* dst, const void* src, int64_t n, float alpha) {
  accumulate_span_simd<Avx2Floats, Src, Overwrite>(dst, static_cast<const Src*>(src), n, alpha);
}
#endif

template <class Src, bool Overwrite>
SpanKernel span_kernel_for(Isa isa) {
#if defined(MEMENGINE_X86_SIMD)
  if (isa == Isa::avx512) return &accumulate_span_avx512<Src, Overwrite>;
  if (isa == Isa::avx2) return &accumulate_span_avx2<Src, Overwrite>;
#endif
  (void)isa;
  return &accumulate_span_scalar<Src, Overwrite>;
}

template <bool Overwrite>
SpanKernel span_kernel_for(at::ScalarType src_dtype, Isa isa) {
  switch (src_dtype) {
    case at::kBFloat16:
      return span_kernel_for<c10::BFloat16, Overwrite>(isa);
    case at::kHalf:
      return span_kernel_for<c10::Half, Overwrite>(isa);
    default:
      return span_kernel_for<float, Overwrite>(isa);
  }
}

SpanKernel span_kernel_for(at::ScalarType src_dtype, bool overwrite) {
  const Isa isa = active_isa();
  return overwrite ? span_kernel_for<true>(src_dtype, isa) : span_kernel_for<false>(src_dtype, isa);
}

template <class Src>
void accumulate_strided_span(char* dst, int64_t dst_stride, const char* src, int64_t src_stride, int64_t n, float alpha,
                             bool overwrite) {
  for (int64_t i = 0; i < n; ++i) {
    float* d = reinterpret_cast<float*>(dst + i * dst_stride);
    const float s = static_cast<float>(*reinterpret_cast<const Src*>(src + i * src_stride));
    *d = overwrite ? accumulate_value<true>(*d, s, alpha) : accumulate_value<false>(*d, s, alpha);
  }
}

void accumulate_strided(const at::Tensor& dst, const at::Tensor& src, float alpha, bool overwrite) {
  // dst is both the output and the first input, as in ATen's own in-place binary ops.
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .set_check_mem_overlap(false)  // checked by check_accumulate_pair
                                .check_all_same_dtype(false)
                                .resize_outputs(false)
                                .add_output(dst)
                                .add_const_input(dst)
                                .add_const_input(src)
                                .build();
  const SpanKernel dense = span_kernel_for(src.scalar_type(), overwrite);
  const int64_t src_size = src.element_size();
  const at::ScalarType src_dtype = src.scalar_type();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t j = 0; j < size1; ++j) {
          char* d = data[0] + j * strides[3];
          const char* s = data[2] + j * strides[5];
          if (strides[0] == static_cast<int64_t>(sizeof(float)) && strides[2] == src_size) {
            dense(reinterpret_cast<float*>(d), s, size0, alpha);
          } else if (src_dtype == at::kBFloat16) {
            accumulate_strided_span<c10::BFloat16>(d, strides[0], s, strides[2], size0, alpha, overwrite);
          } else if (src_dtype == at::kHalf) {
            accumulate_strided_span<c10::Half>(d, strides[0], s, strides[2], size0, alpha, overwrite);
          } else {
            accumulate_strided_span<float>(d, strides[0], s, strides[2], size0, alpha, overwrite);
          }
        }
      },
      kGrainSize);
}

void accumulate_checked(const at::Tensor& dst, const at::Tensor& src, float alpha, bool overwrite) {
  if (dst.numel() == 0) {
    return;
  }
  if (dst.is_contiguous() && src.is_contiguous()) {
    const SpanKernel kernel = span_kernel_for(src.scalar_type(), overwrite);
    float* d = dst.data_ptr<float>();
    const char* s = static_cast<const char*>(src.const_data_ptr());
    const int64_t src_size = src.element_size();
    at::parallel_for(0, dst.numel(), kGrainSize,
                     [&](int64_t begin, int64_t end) { kernel(d + begin, s + begin * src_size, end - begin, alpha); });
  } else {
    accumulate_strided(dst, src, alpha, overwrite);
  }
}

float resolve_alpha(const char* op, double alpha, const std::optional<at::Tensor>& alpha_tensor,
                    const at::Device& device) {
  check_scalar_tensor(op, alpha_tensor, device);
  return host_scalar(alpha, alpha_tensor);
}

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), " but the CPU kernel was called");
}

}  // namespace

void accumulate_(const at::Tensor& dst, const at::Tensor& src, double alpha,
                 const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_accumulate_pair(kOp, dst, src, "dst", "src");
  check_cpu(kOp, dst, "dst");
  accumulate_checked(dst, src, resolve_alpha(kOp, alpha, alpha_tensor, dst.device()), overwrite);
}

void multi_accumulate_(at::TensorList dsts, at::TensorList srcs, double alpha,
                       const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  TORCH_CHECK_VALUE(dsts.size() == srcs.size(), kMultiOp, ": dsts has ", dsts.size(), " tensors but srcs has ",
                    srcs.size(), "; pass one source per destination");
  if (dsts.empty()) {
    return;
  }
  for (size_t i = 0; i < dsts.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    check_accumulate_pair(kMultiOp, dsts[i], srcs[i], "dsts" + index, "srcs" + index);
    check_cpu(kMultiOp, dsts[i], ("dsts" + index).c_str());
  }
  check_multi_disjoint(kMultiOp, dsts, srcs);
  const float a = resolve_alpha(kMultiOp, alpha, alpha_tensor, dsts[0].device());
  for (size_t i = 0; i < dsts.size(); ++i) {
    accumulate_checked(dsts[i], srcs[i], a, overwrite);
  }
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) {
  m.impl("accumulate_", &accumulate_);
  m.impl("multi_accumulate_", &multi_accumulate_);
}

}  // namespace memengine::cpu
