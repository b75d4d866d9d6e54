// CPU kernel of wgrad_accumulate_: main_grad <- (overwrite ? 0 : main_grad) + alpha * G^T X.
//
// PyTorch's CPU matmul cannot produce an fp32 result from bf16/fp16 operands (out_dtype is
// CUDA-only), so its "lossy" path rounds G^T X to bf16 and its exact path first copies both
// inputs to fp32. Here the product goes straight into main_grad with fp32 sums, through one of
// three GEMMs (chosen in choose_path(), see wgrad_accumulate.h): MKL's mixed-precision GEMM,
// memengine's AVX512-BF16 kernel, or bounded fp32 chunks. Never a full-size temporary.
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

// Sets oneDNN's precision for fp32 matmul for the lifetime of the guard (the setting is global).
class MatmulPrecisionGuard {
 public:
  explicit MatmulPrecisionGuard(at::Float32Precision precision)
      : saved_(at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) {
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, precision);
  }
  ~MatmulPrecisionGuard() {
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, saved_);
  }
  MatmulPrecisionGuard(const MatmulPrecisionGuard&) = delete;
  MatmulPrecisionGuard& operator=(const MatmulPrecisionGuard&) = delete;

 private:
  at::Float32Precision saved_;
};

// Bytes of fp32 copies the chunked path holds at once, and its most tokens per addmm: each chunk's
// sum is added to main_grad separately, which kept oneDNN's bf16 fast-math error at the exact fp32
// path's (4100 tokens, 64 x 48: 2.5x its error in one call, 0.8x in chunks of 256 tokens).
constexpr int64_t kChunkBytes = int64_t{32} << 20;
constexpr int64_t kChunkTokens = 256;

// PyTorch's addmm_ on fp32 operands: the inputs themselves when they are fp32, else fp32 copies
// of bounded token chunks. bf16 operands use oneDNN's bf16 fast math, exact for values that are
// bf16 already; fp16 and fp32 operands use IEEE fp32 whatever the user's global setting is.
void addmm_in_chunks(const at::Tensor& main_grad, const at::Tensor& g, const at::Tensor& x, float alpha,
                     bool overwrite) {
  const MatmulPrecisionGuard precision(g.scalar_type() == at::kBFloat16 ? at::Float32Precision::BF16
                                                                        : at::Float32Precision::IEEE);
  at::Tensor out = main_grad;  // addmm_ needs a non-const Tensor; this one is a handle to the same buffer
  const int64_t tokens = g.size(0);
  const int64_t chunk = g.scalar_type() == at::kFloat
                            ? tokens
                            : std::clamp<int64_t>(kChunkBytes / (4 * (g.size(1) + x.size(1))), 1, kChunkTokens);
  for (int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    const int64_t t1 = std::min(tokens, t0 + chunk);
    const at::Tensor g_chunk = g.slice(0, t0, t1).to(at::kFloat), x_chunk = x.slice(0, t0, t1).to(at::kFloat);
    out.addmm_(g_chunk.t(), x_chunk, overwrite && t0 == 0 ? 0 : 1, alpha);
  }
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
  const at::Tensor g = as_token_matrix(grad_output), x = as_token_matrix(input);
  const int64_t tokens = g.size(0), out_features = main_grad.size(0), in_features = main_grad.size(1);
  at::Tensor buffer = main_grad;
  if (tokens == 0) {
    if (overwrite) buffer.zero_();
    return;
  }
  float* const c = buffer.data_ptr<float>();
  const int64_t ldc = main_grad.stride(0);
  if (g.scalar_type() == at::kBFloat16) {
    const auto* g_data = g.const_data_ptr<c10::BFloat16>();
    const auto* x_data = x.const_data_ptr<c10::BFloat16>();
    switch (choose_path(false)) {
      case WgradPath::avx512_bf16:
        bf16_gemm_tn(out_features, in_features, tokens, a, g_data, g.stride(0), x_data, x.stride(0), overwrite, c, ldc);
        return;
      case WgradPath::mkl:
        if (mkl_gemm_tn(out_features, in_features, tokens, a, g_data, g.stride(0), x_data, x.stride(0), overwrite, c,
                        ldc)) {
          return;
        }
        break;  // a row stride beyond 32 bits: chunked copies are contiguous
      default:
        break;
    }
  } else if (g.scalar_type() == at::kHalf && choose_path(true) == WgradPath::mkl &&
             mkl_gemm_tn(out_features, in_features, tokens, a, g.const_data_ptr<c10::Half>(), g.stride(0),
                         x.const_data_ptr<c10::Half>(), x.stride(0), overwrite, c, ldc)) {
    return;
  }
  addmm_in_chunks(main_grad, g, x, a, overwrite);
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) { m.impl("wgrad_accumulate_", &wgrad_accumulate_); }

}  // namespace memengine::cpu
