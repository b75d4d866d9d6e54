// Per-element math of the cross_entropy_tile ops (one vocabulary tile of a language model's head and its
// cross-entropy; memengine/ops/linear_cross_entropy.py drives them), shared by the CPU kernel's scalar path and
// the CUDA kernels. The CPU kernel's AVX-512 path and the Triton kernels compute these same formulas, in this
// order, on vectors; memengine/ops/reference.py is the oracle.
//
// A tile holds the raw logits x of `tile` vocabulary entries for `rows` tokens, transposed: [tile, rows].
#pragma once

#include <cmath>
#include <cstdint>

#include "memengine/macros.h"

namespace memengine {

// The logit the loss sees: z = (x + bias) * scale, then, with a softcap c > 0, c * tanh(z / c) (Gemma 2's
// final_logit_softcapping). `capped` receives tanh(z / c) (0 without a cap): the cap's derivative is
// scale * (1 - capped^2).
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float transformed_logit(float raw, float bias, float scale,
                                                                      float softcap, float& capped) {
  const float z = (raw + bias) * scale;
  if (softcap > 0.0f) {
    capped = tanhf(z / softcap);
    return capped * softcap;
  }
  capped = 0.0f;
  return z;
}

// The gradient of the loss w.r.t. a raw logit x, given its transformed logit z (and `capped`), its token's
// log-sum-exp and the token's scales: probability_scale = d loss / d p factor (the loss's gradient, times
// 1 + 2 z_loss lse with a z-loss), row_scale = the loss's gradient (0 for an ignored token), uniform = label
// smoothing / vocabulary, target_weight = 1 - label smoothing:
//   (exp(z - lse) * probability_scale - uniform * row_scale - [x is the label's] target_weight * row_scale)
//   * (1 - capped^2 with a cap) * scale
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE float logit_gradient(float z, float capped, bool is_label, float lse,
                                                                   float probability_scale, float row_scale,
                                                                   float uniform, float target_weight, float scale,
                                                                   bool has_cap) {
  float gradient = expf(z - lse) * probability_scale;
  gradient -= uniform * row_scale;
  if (is_label) gradient -= target_weight * row_scale;
  if (has_cap) gradient *= 1.0f - capped * capped;
  return gradient * scale;
}

// The row's label as an index into the tile that starts at vocabulary entry `start` with `tile` entries,
// or -1 when the label lies outside it (another tile's, or ignore_index).
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE int64_t label_in_tile(int64_t label, int64_t start, int64_t tile) {
  const int64_t index = label - start;
  return index >= 0 && index < tile ? index : -1;
}

// Merges one tile's maximum and sum of exp(z - tile_max) into a row's running (maximum, sum): the online
// log-sum-exp over vocabulary tiles. A NaN logit that a maximum drops still reaches the sum (exp(NaN) is NaN).
MEMENGINE_HOST_DEVICE MEMENGINE_ALWAYS_INLINE void merge_log_sum_exp(float& running_max, float& running_sum,
                                                                     float tile_max, float tile_sum) {
  const float new_max = fmaxf(running_max, tile_max);
  running_sum = running_sum * expf(running_max - new_max) + tile_sum * expf(tile_max - new_max);
  running_max = new_max;
}

}  // namespace memengine
