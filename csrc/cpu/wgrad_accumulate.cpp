// CPU kernel of wgrad_accumulate_: main_grad <- (overwrite ? 0 : main_grad) + alpha * G^T X.
//
// PyTorch's CPU matmul cannot produce an fp32 result from bf16/fp16 operands (out_dtype is
// CUDA-only), so its "lossy" path rounds G^T X to bf16 and its exact path first copies both
// inputs to fp32. Here the product goes straight into main_grad with fp32 sums, through one of
// three GEMMs (chosen in choose_path(), see wgrad_accumulate.h): MKL's mixed-precision GEMM,
// memengine's AVX512-BF16 kernel, or bounded fp32 chunks. Never a full-size temporary, and never
// a change to a process-wide setting.
#include "wgrad_accumulate.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "bf16_gemm.h"
#include "memengine/scalar_argument.h"
#include "memengine/wgrad_checks.h"
#include "mkl_gemm.h"
#include "simd.h"

#if defined(MEMENGINE_X86_SIMD)
#include <cpuid.h>
#endif

namespace memengine::cpu {
namespace {

enum class WgradPath { automatic, mkl, avx512_bf16, chunked };

constexpr const char* kPathNames[] = {"auto", "mkl", "avx512_bf16", "chunked"};

std::optional<WgradPath> parse_path(const std::string& name) {
  for (int i = 0; i < 4; ++i) {
    if (name == kPathNames[i]) return static_cast<WgradPath>(i);
  }
  return std::nullopt;
}

// AMX-BF16 (CPUID.(EAX=7,ECX=0):EDX[22]): MKL then multiplies bf16 on tile units, far faster
// than any AVX-512 kernel (FACTS.md: 21 ms against 37.5 ms for PyTorch's lossy path on such a Xeon).
// Read once: under a hypervisor every cpuid traps, and choose_path() runs on each call.
bool has_amx_bf16() {
#if defined(MEMENGINE_X86_SIMD)
  static const bool present = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && ((edx >> 22) & 1u) != 0;
  }();
  return present;
#else
  return false;
#endif
}

bool runs_here(WgradPath path, bool half) {
  switch (path) {
    case WgradPath::mkl:
      return mkl_gemm_available(half);
    case WgradPath::avx512_bf16:
      return !half && bf16_gemm_supported();
    default:
      return true;
  }
}

std::atomic<WgradPath>& requested() {
  static std::atomic<WgradPath> path{[] {
    const char* env = std::getenv("MEMENGINE_WGRAD_CPU");
    if (env == nullptr || *env == '\0') return WgradPath::automatic;
    const auto parsed = parse_path(env);
    if (!parsed || !(runs_here(*parsed, false) || runs_here(*parsed, true))) {
      TORCH_WARN("memengine: MEMENGINE_WGRAD_CPU=", env,
                 " is unknown or cannot run on this machine; using auto (see `python -m memengine info`)");
      return WgradPath::automatic;
    }
    return *parsed;
  }()};
  return path;
}

WgradPath choose_path(bool half) {
  const WgradPath wanted = requested().load(std::memory_order_relaxed);
  if (wanted != WgradPath::automatic && runs_here(wanted, half)) return wanted;
  if (!half && has_amx_bf16() && mkl_gemm_available(false)) return WgradPath::mkl;
  if (!half && bf16_gemm_supported()) return WgradPath::avx512_bf16;
  if (mkl_gemm_available(half)) return WgradPath::mkl;
  return WgradPath::chunked;
}

// Whether PyTorch's fp32 addmm sums the exact products of these operands' values in IEEE fp32
// under the user's oneDNN setting (torch.backends.mkldnn.matmul.fp32_precision). That setting is
// process-wide, so it is only read, never changed: a kernel that set it, even for the length of a
// call, ran other threads' fp32 matmuls at its precision (and two concurrent calls left it at bf16
// for good). bf16 values are exact in bf16 and tf32, fp16 values in tf32 but not in bf16.
bool addmm_is_exact_for(at::ScalarType operands) {
  switch (at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) {
    case at::Float32Precision::BF16:
      return operands == at::kBFloat16;
    case at::Float32Precision::TF32:
      return operands != at::kFloat;
    default:
      return true;
  }
}

// Bytes of copies the chunked path holds at once, and its most tokens per addmm: each chunk's sum
// is added to main_grad separately, which keeps oneDNN's error at the exact fp32 path's when the
// user's setting lets it multiply bf16 (4100 tokens, 64 x 48: 2.5x its error in one call, 0.8x in
// chunks of 256 tokens).
constexpr int64_t kChunkBytes = int64_t{32} << 20;
constexpr int64_t kChunkTokens = 256;

// main_grad (+)= alpha * G^T X through PyTorch's addmm_ on fp32 operands: the inputs themselves
// when they are fp32, else fp32 copies of bounded token chunks. Where the user's setting would
// round the operands (addmm_is_exact_for), the chunks are fp64 instead, multiplied a bounded
// block of main_grad's rows at a time: fp64 GEMMs never lower their precision, and their sums,
// rounded once into main_grad, are at least as exact as fp32 ones.
void addmm_in_chunks(const at::Tensor& main_grad, const at::Tensor& g, const at::Tensor& x, float alpha,
                     bool overwrite) {
  const bool in_fp32 = addmm_is_exact_for(g.scalar_type());
  const at::ScalarType compute = in_fp32 ? at::kFloat : at::kDouble;
  const int64_t tokens = g.size(0), out_features = g.size(1), in_features = x.size(1);
  const int64_t bytes_per_token = (in_fp32 ? 4 : 8) * (out_features + in_features);
  const int64_t chunk =
      g.scalar_type() == compute ? tokens : std::clamp<int64_t>(kChunkBytes / bytes_per_token, 1, kChunkTokens);
  // fp32: addmm_ writes main_grad in place. fp64: each block's product is a temporary.
  const int64_t rows = in_fp32 ? out_features : std::clamp<int64_t>(kChunkBytes / (8 * in_features), 1, out_features);
  for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const int64_t t1 = std::min(tokens, t0 + chunk);
    const at::Tensor g_chunk = g.slice(0, t0, t1).to(compute), x_chunk = x.slice(0, t0, t1).to(compute);
    const bool first = overwrite && t0 == 0;  // then main_grad's old values (NaN included) are ignored
    for (int64_t r0 = 0; r0 < out_features; r0 += rows) {
      const int64_t r1 = std::min(out_features, r0 + rows);
      at::Tensor out = main_grad.slice(0, r0, r1);
      const at::Tensor g_rows = g_chunk.slice(1, r0, r1).t();
      if (in_fp32) {
        out.addmm_(g_rows, x_chunk, first ? 0 : 1, alpha);
      } else if (first) {
        out.copy_(at::mm(g_rows, x_chunk).mul_(static_cast<double>(alpha)));
      } else {
        out.add_(at::mm(g_rows, x_chunk), alpha);  // computed in fp64, rounded once
      }
    }
  }
}

// A [tokens, features] matrix from as_token_matrix as a GEMM operand: row-major, or a .t() view.
template <class T>
GemmOperand<T> gemm_operand(const at::Tensor& m) {
  const bool tokens_contiguous = !is_row_major(m);
  return {m.const_data_ptr<T>(), tokens_contiguous ? m.stride(1) : m.stride(0), tokens_contiguous};
}

}  // namespace

void set_wgrad_path(const std::string& name) {
  const auto parsed = parse_path(name);
  TORCH_CHECK_VALUE(parsed.has_value(), "unknown wgrad CPU path '", name,
                    "'; use one of auto, mkl, avx512_bf16, chunked");
  TORCH_CHECK_VALUE(
      runs_here(*parsed, false) || runs_here(*parsed, true), "wgrad CPU path '", name, "' cannot run on this machine (",
      *parsed == WgradPath::mkl ? "PyTorch was built without MKL's mixed-precision GEMM" : "the CPU has no AVX512-BF16",
      ")");
  requested().store(*parsed, std::memory_order_relaxed);
}

std::string wgrad_path(at::ScalarType dtype) {
  if (dtype == at::kFloat) return "fp32_addmm";
  return kPathNames[static_cast<int>(choose_path(dtype == at::kHalf))];
}

void wgrad_accumulate_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input,
                       double alpha, const std::optional<at::Tensor>& alpha_tensor, bool overwrite) {
  check_wgrad_args(main_grad, grad_output, input, alpha_tensor);
  TORCH_CHECK_VALUE(main_grad.device().is_cpu(), "wgrad_accumulate_: main_grad is on ", main_grad.device(),
                    " but the CPU kernel was called");
  if (main_grad.numel() == 0) return;
  const float a = host_scalar(alpha, alpha_tensor);
  // Both GEMMs and the chunked path read a .t() view of a row-major matrix where it lies.
  const at::Tensor g = as_token_matrix(grad_output, true), x = as_token_matrix(input, true);
  const int64_t tokens = g.size(0), out_features = main_grad.size(0), in_features = main_grad.size(1);
  at::Tensor buffer = main_grad;
  if (tokens == 0) {
    if (overwrite) buffer.zero_();
    return;
  }
  float* const c = buffer.data_ptr<float>();
  const int64_t ldc = main_grad.stride(0);
  if (g.scalar_type() == at::kBFloat16) {
    const auto g_operand = gemm_operand<c10::BFloat16>(g), x_operand = gemm_operand<c10::BFloat16>(x);
    switch (choose_path(false)) {
      case WgradPath::avx512_bf16:
        bf16_gemm_tn(out_features, in_features, tokens, a, g_operand, x_operand, overwrite, c, ldc);
        return;
      case WgradPath::mkl:
        if (mkl_gemm_tn(out_features, in_features, tokens, a, g_operand, x_operand, overwrite, c, ldc)) {
          return;
        }
        break;  // a row stride beyond 32 bits: chunked copies are contiguous
      default:
        break;
    }
  } else if (g.scalar_type() == at::kHalf && choose_path(true) == WgradPath::mkl &&
             mkl_gemm_tn(out_features, in_features, tokens, a, gemm_operand<c10::Half>(g), gemm_operand<c10::Half>(x),
                         overwrite, c, ldc)) {
    return;
  }
  addmm_in_chunks(main_grad, g, x, a, overwrite);
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) { m.impl("wgrad_accumulate_", &wgrad_accumulate_); }

}  // namespace memengine::cpu
