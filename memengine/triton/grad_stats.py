"""Triton kernel of grad_stats_: flat *= scale; [L2 norm of finite values, non-finite count].

Each program scales one block and writes its partial sum of squares (float64) and count; the
partials are then added by torch in a fixed order, so results are deterministic. A norm beyond
float32's range is +inf and counts as one more non-finite value (reference.grad_stats_result).
"""

import torch
import triton
import triton.language as tl

from memengine.ops import fake
from memengine.ops.reference import grad_stats_result
from memengine.ops.validation import check_grad_stats_args

BLOCK_SIZE = 4096


@triton.jit
def _grad_stats_kernel(
    x_ptr,
    squares_ptr,
    counts_ptr,
    scale_ptr,
    scale_value,
    n,
    SCALE: tl.constexpr,
    SCALE_FROM_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if SCALE:
        if SCALE_FROM_TENSOR:
            scale = tl.load(scale_ptr)
        else:
            scale = tl.cast(scale_value, tl.float32)
        x = x * scale
        tl.store(x_ptr + offsets, x, mask=mask)
    finite = (x - x) == 0.0
    clean = tl.where(finite, x, 0.0).to(tl.float64)
    tl.store(squares_ptr + program, tl.sum(clean * clean, axis=0))
    tl.store(counts_ptr + program, tl.sum((~finite & mask).to(tl.int64), axis=0))


@torch.library.custom_op("memengine::_triton_grad_stats_", mutates_args=("flat",))
def triton_grad_stats_(
    flat: torch.Tensor, scale: float = 1.0, scale_tensor: torch.Tensor | None = None
) -> torch.Tensor:
    check_grad_stats_args(flat, scale_tensor)
    n = flat.numel()
    programs = max(1, triton.cdiv(n, BLOCK_SIZE))
    squares = torch.zeros(programs, dtype=torch.float64, device=flat.device)
    counts = torch.zeros(programs, dtype=torch.int64, device=flat.device)
    if n > 0:
        if scale_tensor is not None:
            scale_tensor = scale_tensor.to(flat.device)
        _grad_stats_kernel[(programs,)](
            flat,
            squares,
            counts,
            scale_tensor if scale_tensor is not None else flat,
            float(scale),
            n,
            SCALE=scale_tensor is not None or scale != 1.0,
            SCALE_FROM_TENSOR=scale_tensor is not None,
            BLOCK=BLOCK_SIZE,
        )
    return grad_stats_result(squares.sum().sqrt(), counts.sum())


triton_grad_stats_.register_fake(fake.grad_stats_fake)
