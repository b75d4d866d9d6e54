// Run-time binding of MKL's mixed-precision GEMMs (see mkl_gemm.h).
#include "mkl_gemm.h"

#include <algorithm>
#include <climits>
#include <type_traits>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define MEMENGINE_HAVE_DLSYM 1
#endif

namespace memengine::cpu {
namespace {

// CBLAS enum values (cblas.h); declared here because MKL's headers are not shipped with torch.
constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

// Same signature for both: only the element type of A and B differs (both 16-bit).
using GemmFn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const void* a, int lda,
                        const void* b, int ldb, float beta, float* c, int ldc);

void* find_symbol(const char* name) {
#if defined(MEMENGINE_HAVE_DLSYM)
  // libtorch_cpu is already loaded (we link against it); RTLD_NOLOAD never loads a new copy.
  for (const char* library : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    if (void* handle = dlopen(library, RTLD_LAZY | RTLD_NOLOAD)) {
      if (void* symbol = dlsym(handle, name)) return symbol;
    }
  }
  return dlsym(RTLD_DEFAULT, name);
#else
  (void)name;
  return nullptr;
#endif
}

GemmFn gemm_function(bool half) {
  static const GemmFn bf16 = reinterpret_cast<GemmFn>(find_symbol("cblas_gemm_bf16bf16f32"));
  static const GemmFn f16 = reinterpret_cast<GemmFn>(find_symbol("cblas_gemm_f16f16f32"));
  return half ? f16 : bf16;
}

// Pieces small enough for 32-bit MKL_INT sizes (the limit is INT_MAX; 2^30 keeps pointers aligned).
constexpr int64_t kMaxPiece = int64_t{1} << 30;

}  // namespace

bool mkl_gemm_available(bool half) { return gemm_function(half) != nullptr; }

template <class Src>
bool mkl_gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, GemmOperand<Src> a, GemmOperand<Src> b, bool overwrite,
                 float* c, int64_t ldc) {
  const GemmFn gemm = gemm_function(std::is_same_v<Src, c10::Half>);
  if (gemm == nullptr || std::max({a.ld, b.ld, ldc}) > INT_MAX) return false;
  // A is read as op(A) = A^T: stored [k, m], transposed; stored [m, k] (tokens contiguous), as it is. B likewise.
  const int transa = a.tokens_contiguous ? kNoTrans : kTrans, transb = b.tokens_contiguous ? kTrans : kNoTrans;
  for (int64_t k0 = 0; k0 < k; k0 += kMaxPiece) {
    const int64_t kk = std::min(kMaxPiece, k - k0);
    // beta = 0 on the first piece of an overwrite: MKL then ignores C (NaN included).
    const float beta = overwrite && k0 == 0 ? 0.0f : 1.0f;
    for (int64_t m0 = 0; m0 < m; m0 += kMaxPiece) {
      for (int64_t n0 = 0; n0 < n; n0 += kMaxPiece) {
        gemm(kRowMajor, transa, transb, static_cast<int>(std::min(kMaxPiece, m - m0)),
             static_cast<int>(std::min(kMaxPiece, n - n0)), static_cast<int>(kk), alpha,
             a.from_token(k0).from_column(m0).data, static_cast<int>(a.ld), b.from_token(k0).from_column(n0).data,
             static_cast<int>(b.ld), beta, c + m0 * ldc + n0, static_cast<int>(ldc));
      }
    }
  }
  return true;
}

template bool mkl_gemm_tn<c10::BFloat16>(int64_t, int64_t, int64_t, float, GemmOperand<c10::BFloat16>,
                                         GemmOperand<c10::BFloat16>, bool, float*, int64_t);
template bool mkl_gemm_tn<c10::Half>(int64_t, int64_t, int64_t, float, GemmOperand<c10::Half>, GemmOperand<c10::Half>,
                                     bool, float*, int64_t);

}  // namespace memengine::cpu
