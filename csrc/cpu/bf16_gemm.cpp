// bf16 GEMM with fp32 accumulation on AVX512-BF16 (see bf16_gemm.h).
//
// vdpbf16ps multiplies pairs of bf16 values and adds both products to an fp32 lane, so both
// operands are packed with the two tokens of a pair side by side in 32 bits:
//   packed[panel][pair][j] = (low: row 2*pair, high: row 2*pair + 1) of column panel*width + j.
// A (grad_output) is packed in panels of kRows columns and broadcast one pair at a time; B
// (input) in panels of kColumns columns, two registers per pair. A micro tile keeps a
// kRows x kColumns block of C in 24 registers. Tokens are processed in blocks whose packed
// copy fits the scratch budget; C tiles are split among threads, never shared by two.
#include "bf16_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "simd.h"

namespace memengine::cpu {
namespace {

// A 12 x 32 micro tile: 24 accumulator registers, 2 loads and 12 broadcasts per 24 vdpbf16ps.
// (8 x 48 and 6 x 64 measured the same within noise: 330-380 GFLOP/s on 2 cores.)
constexpr int64_t kRows = 12;    // rows of C (output features) per micro tile
constexpr int64_t kVectors = 2;  // 16-float registers per row of a micro tile
constexpr int64_t kColumns = 16 * kVectors;
// Token pairs per pass over a C tile: a packed B panel of 128 pairs is 16 KiB and stays in L1.
constexpr int64_t kDepthPairs = 128;
constexpr int64_t kPanelsPerTask = 8;  // a thread's C block: 8 x 8 micro tiles (96 x 256)
constexpr int64_t kScratchBytes = int64_t{16} << 20;
constexpr int64_t kMaxBlockTokens = 2048;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tokens per packed block: as many as the scratch budget allows (a multiple of 2 * kDepthPairs
// when possible), so the scratch stays bounded however many tokens there are.
int64_t block_tokens(int64_t packed_width, int64_t tokens) {
  int64_t block =
      std::clamp<int64_t>(kScratchBytes / (int64_t{sizeof(uint32_t)} * packed_width) * 2, 2, kMaxBlockTokens);
  block = block >= 2 * kDepthPairs ? block / (2 * kDepthPairs) * (2 * kDepthPairs) : block / 2 * 2;
  return std::min(block, (tokens + 1) / 2 * 2);
}

}  // namespace

#if defined(MEMENGINE_X86_SIMD)
#define MEMENGINE_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

namespace {

// Packs `tokens` rows of panel `panel` (Panel columns wide) of a row-major bf16 matrix `src`
// with `width` columns and row stride `ld`. Columns and the odd last token beyond the matrix are
// zero, so the micro tile needs no edge cases in its inner loop.
template <int64_t Panel>
MEMENGINE_TARGET_AVX512_BF16 void pack_panel(const uint16_t* src, int64_t ld, int64_t width, int64_t tokens,
                                             int64_t panel, uint32_t* out) {
  const int64_t first = panel * Panel;
  const int64_t columns = std::min(Panel, width - first);
  for (int64_t t = 0; t < tokens; t += 2, out += Panel) {
    const uint16_t* even = src + t * ld + first;
    if (columns == Panel && t + 1 < tokens) {
      const uint16_t* odd = even + ld;
      for (int64_t j = 0; j < Panel; ++j) out[j] = even[j] | (static_cast<uint32_t>(odd[j]) << 16);
      continue;
    }
    for (int64_t j = 0; j < Panel; ++j) {
      const uint32_t low = j < columns ? even[j] : 0;
      const uint32_t high = j < columns && t + 1 < tokens ? even[ld + j] : 0;
      out[j] = low | (high << 16);
    }
  }
}

// pack_panel for an operand stored [width, tokens] (GemmOperand::tokens_contiguous): a pair of tokens of one
// column is one 32-bit load, written Panel entries apart.
template <int64_t Panel>
MEMENGINE_TARGET_AVX512_BF16 void pack_panel_tokens_contiguous(const uint16_t* src, int64_t ld, int64_t width,
                                                               int64_t tokens, int64_t panel, uint32_t* out) {
  const int64_t first = panel * Panel;
  const int64_t columns = std::min(Panel, width - first);
  const int64_t pairs = (tokens + 1) / 2, full_pairs = tokens / 2;
  for (int64_t j = 0; j < Panel; ++j) {
    if (j >= columns) {
      for (int64_t p = 0; p < pairs; ++p) out[p * Panel + j] = 0;
      continue;
    }
    const uint16_t* column = src + (first + j) * ld;
    for (int64_t p = 0; p < full_pairs; ++p) {
      uint32_t pair;
      std::memcpy(&pair, column + 2 * p, sizeof(pair));  // little-endian: token 2p low, 2p + 1 high
      out[p * Panel + j] = pair;
    }
    if (full_pairs < pairs) out[full_pairs * Panel + j] = column[2 * full_pairs];
  }
}

template <int64_t Panel>
void pack(const GemmOperand<c10::BFloat16>& operand, int64_t width, int64_t t0, int64_t tokens, int64_t panel,
          uint32_t* out) {
  const auto* bits = reinterpret_cast<const uint16_t*>(operand.from_token(t0).data);
  if (operand.tokens_contiguous) {
    pack_panel_tokens_contiguous<Panel>(bits, operand.ld, width, tokens, panel, out);
  } else {
    pack_panel<Panel>(bits, operand.ld, width, tokens, panel, out);
  }
}

// C tile (rows x columns of C, at most kRows x kColumns) <- (first ? 0 : C) + alpha * A_panel^T B_panel
// over `pairs` packed token pairs.
MEMENGINE_TARGET_AVX512_BF16 void micro_tile(int64_t pairs, const uint32_t* a, const uint32_t* b, float* c, int64_t ldc,
                                             int64_t rows, int64_t columns, float alpha, bool first) {
  __m512 acc[kRows][kVectors];
#pragma GCC unroll 16
  for (int64_t r = 0; r < kRows; ++r) {
#pragma GCC unroll 4
    for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p, a += kRows, b += kColumns) {
    __m512bh b_pairs[kVectors];
#pragma GCC unroll 4
    for (int64_t v = 0; v < kVectors; ++v) b_pairs[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + 16 * v));
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      const auto a_pair = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[r])));
#pragma GCC unroll 4
      for (int64_t v = 0; v < kVectors; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a_pair, b_pairs[v]);
    }
  }
  __mmask16 masks[kVectors];
#pragma GCC unroll 4
  for (int64_t v = 0; v < kVectors; ++v) {
    const int64_t valid = std::clamp<int64_t>(columns - 16 * v, 0, 16);
    masks[v] = static_cast<__mmask16>((uint32_t{1} << valid) - 1);
  }
  const __m512 scale = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int64_t r = 0; r < kRows; ++r) {
    if (r >= rows) break;
    float* row = c + r * ldc;
#pragma GCC unroll 4
    for (int64_t v = 0; v < kVectors; ++v) {
      const __m512 base = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(masks[v], row + 16 * v);
      _mm512_mask_storeu_ps(row + 16 * v, masks[v], _mm512_fmadd_ps(scale, acc[r][v], base));
    }
  }
}

}  // namespace

bool bf16_gemm_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return supported;
}

void bf16_gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, GemmOperand<c10::BFloat16> a,
                  GemmOperand<c10::BFloat16> b, bool overwrite, float* c, int64_t ldc) {
  TORCH_CHECK(bf16_gemm_supported(), "bf16_gemm_tn: this CPU has no AVX512-BF16");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (overwrite) {
      for (int64_t r = 0; r < m; ++r) std::fill_n(c + r * ldc, n, 0.0f);
    }
    return;
  }
  const int64_t m_panels = ceil_div(m, kRows), n_panels = ceil_div(n, kColumns);
  const int64_t a_width = m_panels * kRows, b_width = n_panels * kColumns;
  const int64_t block = block_tokens(a_width + b_width, k);
  const at::Tensor scratch = at::empty({block / 2 * (a_width + b_width)}, at::kInt);
  auto* const packed_a = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  const int64_t m_tasks = ceil_div(m_panels, kPanelsPerTask), n_tasks = ceil_div(n_panels, kPanelsPerTask);
  for (int64_t t0 = 0; t0 < k; t0 += block) {
    const int64_t tokens = std::min(block, k - t0), pairs = (tokens + 1) / 2;
    uint32_t* const packed_b = packed_a + pairs * a_width;
    at::parallel_for(0, m_panels + n_panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (p < m_panels) {
          pack<kRows>(a, m, t0, tokens, p, packed_a + p * pairs * kRows);
        } else {
          const int64_t q = p - m_panels;
          pack<kColumns>(b, n, t0, tokens, q, packed_b + q * pairs * kColumns);
        }
      }
    });
    const bool first_block = overwrite && t0 == 0;
    at::parallel_for(0, m_tasks * n_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t mp_begin = task / n_tasks * kPanelsPerTask, np_begin = task % n_tasks * kPanelsPerTask;
        const int64_t mp_end = std::min(mp_begin + kPanelsPerTask, m_panels);
        const int64_t np_end = std::min(np_begin + kPanelsPerTask, n_panels);
        for (int64_t d = 0; d < pairs; d += kDepthPairs) {
          const int64_t depth = std::min(kDepthPairs, pairs - d);
          for (int64_t np = np_begin; np < np_end; ++np) {
            for (int64_t mp = mp_begin; mp < mp_end; ++mp) {
              micro_tile(depth, packed_a + (mp * pairs + d) * kRows, packed_b + (np * pairs + d) * kColumns,
                         c + mp * kRows * ldc + np * kColumns, ldc, std::min(kRows, m - mp * kRows),
                         std::min(kColumns, n - np * kColumns), alpha, first_block && d == 0);
            }
          }
        }
      }
    });
  }
}

#else  // not x86-64 with GCC/Clang: never supported; callers check bf16_gemm_supported() first.

bool bf16_gemm_supported() { return false; }

void bf16_gemm_tn(int64_t, int64_t, int64_t, float, GemmOperand<c10::BFloat16>, GemmOperand<c10::BFloat16>, bool,
                  float*, int64_t) {
  TORCH_CHECK(false, "bf16_gemm_tn: AVX512-BF16 kernels are not built for this platform");
}

#endif

}  // namespace memengine::cpu
