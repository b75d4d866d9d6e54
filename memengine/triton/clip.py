"""Triton kernel of clip_: flat *= min(1, max_norm / (norm + 1e-6)) unless stats[1] > 0 or the
norm is not finite (max_norm / inf = 0 would erase the gradient of a step that is skipped anyway).

The factor is computed on the device from `stats` by every program: no host synchronisation.
"""

import torch
import triton
import triton.language as tl

from memengine.ops import fake
from memengine.ops.validation import check_clip_args

BLOCK_SIZE = 4096


@triton.jit
def _clip_kernel(x_ptr, stats_ptr, max_norm, n, BLOCK: tl.constexpr):
    norm = tl.load(stats_ptr)
    nonfinite = tl.load(stats_ptr + 1)
    # div_rn: correctly rounded, as the C++/CUDA kernels and torch divide. Triton's "/" on fp32 may compile to
    # an approximate division on NVIDIA GPUs; on an H200 this kernel's result differed from the reference's,
    # which this is the likely cause of (not yet re-checked on a GPU).
    coefficient = tl.minimum(tl.math.div_rn(tl.cast(max_norm, tl.float32), norm + 1e-6), 1.0)
    norm_is_finite = (norm - norm) == 0.0  # norm - norm is NaN for inf and NaN
    coefficient = tl.where((nonfinite > 0) | (~norm_is_finite), 1.0, coefficient)
    if coefficient < 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * coefficient, mask=mask)


@torch.library.custom_op("memengine::_triton_clip_", mutates_args=("flat",))
def triton_clip_(flat: torch.Tensor, stats: torch.Tensor, max_norm: float) -> None:
    check_clip_args(flat, stats, max_norm)
    if flat.numel() > 0:
        _clip_kernel[(triton.cdiv(flat.numel(), BLOCK_SIZE),)](
            flat, stats, float(max_norm), flat.numel(), BLOCK=BLOCK_SIZE
        )


triton_clip_.register_fake(fake.clip_fake)
