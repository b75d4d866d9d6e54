// CPU kernel of clip_: flat <- flat * min(1, max_norm / (norm + 1e-6)) unless the statistics
// counted a non-finite value or the norm is not finite. When the factor is 1 the buffer is not
// touched at all.
#include "grad_stats.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "memengine/grad_stats.h"
#include "memengine/grad_stats_checks.h"

namespace memengine::cpu {

void clip_(const at::Tensor& flat, const at::Tensor& stats, double max_norm) {
  check_clip_args(flat, stats, max_norm);
  TORCH_CHECK_VALUE(flat.device().is_cpu(), "clip_: flat is on ", flat.device(), " but the CPU kernel was called");
  const at::Tensor stats_contiguous = stats.contiguous();
  const float* s = stats_contiguous.const_data_ptr<float>();
  const float coefficient = clip_coefficient(s[0], s[1], static_cast<float>(max_norm));
  if (coefficient == 1.0f || flat.numel() == 0) {
    return;
  }
  float* x = flat.data_ptr<float>();
  // A plain loop: GCC vectorises it for the baseline ISA, and the pass is memory bound.
  at::parallel_for(0, flat.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) x[i] = memengine::multiply(x[i], coefficient);
  });
}

TORCH_LIBRARY_IMPL(memengine, CPU, m) { m.impl("clip_", &clip_); }

}  // namespace memengine::cpu
