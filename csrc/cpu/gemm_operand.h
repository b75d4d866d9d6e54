// An operand of the CPU GEMMs of wgrad_accumulate_ (C = A^T B): a [k tokens, width] matrix in either of two
// layouts, so that a transposed view (linear_cross_entropy's weight tile and logit gradient) is read where it
// lies instead of being copied first.
#pragma once

#include <cstdint>

namespace memengine::cpu {

template <class T>
struct GemmOperand {
  const T* data;
  int64_t ld;                      // elements between rows of the stored row-major matrix
  bool tokens_contiguous = false;  // false: stored [k, width] (token t at data + t * ld); true: stored [width, k]

  // The operand from token `t` on.
  GemmOperand from_token(int64_t t) const {
    return {tokens_contiguous ? data + t : data + t * ld, ld, tokens_contiguous};
  }
  // The operand from column `j` on.
  GemmOperand from_column(int64_t j) const {
    return {tokens_contiguous ? data + j * ld : data + j, ld, tokens_contiguous};
  }
};

}  // namespace memengine::cpu
