"""Triton kernels of cross_entropy_tile_forward_ and cross_entropy_tile_backward_ (formulas:
csrc/include/memengine/cross_entropy_tile.h; logits transposed, [tile, rows]).

Forward: one program per block of tokens walks the tile BLOCK_VOCABULARY entries at a time with an online
log-sum-exp (a running maximum and a sum rescaled whenever the maximum grows), then merges the tile's result
into the running (maximum, sum) as memengine::merge_log_sum_exp does. Backward: elementwise, one program per
[BLOCK_VOCABULARY, BLOCK_ROWS] block. tanh is computed from expm1 (Triton has no tanh that its CPU interpreter runs).
"""

import torch
import triton
import triton.language as tl

from memengine.ops import fake
from memengine.ops.validation import check_cross_entropy_tile_backward_args, check_cross_entropy_tile_forward_args

BLOCK_VOCABULARY = 32
BLOCK_ROWS = 64


@triton.jit
def _tanh(x):
    """e / (e + 2) with e = expm1(2x) = 2^n (expm1(r) + 1) - 1, 2x = n ln2 + r: accurate near 0, where
    (exp(2x) - 1) / (exp(2x) + 1) would cancel (the CPU kernel's AVX-512 tanh, in Triton)."""
    y = tl.minimum(
        tl.maximum(2.0 * x, -20.0, propagate_nan=tl.PropagateNan.ALL), 20.0, propagate_nan=tl.PropagateNan.ALL
    )
    n = tl.floor(y * 1.4426950408889634 + 0.5)
    r = y - n * 0.693359375
    r = r - n * -2.12194440e-4
    p = (1.0 / 5040.0) * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    two_n = tl.exp2(n)
    e = p * r * two_n + (two_n - 1.0)
    return e / (e + 2.0)


@triton.jit
def _load_transformed(logits_ptr, bias_ptr, offsets, v, mask, vocabulary_mask, scale, softcap, HAS_BIAS, HAS_CAP):
    """(z, tanh(z / softcap) or 0) of a block: memengine::transformed_logit."""
    x = tl.load(logits_ptr + offsets, mask=mask, other=0.0)
    if HAS_BIAS:
        x += tl.load(bias_ptr + v, mask=vocabulary_mask, other=0.0)[:, None]
    z = x * scale
    capped = tl.zeros_like(z)
    if HAS_CAP:
        capped = _tanh(z / softcap)
        z = capped * softcap
    return z, capped


@triton.jit
def _forward_kernel(
    logits_ptr,
    bias_ptr,
    labels_ptr,
    max_ptr,
    sum_ptr,
    target_ptr,
    logit_sum_ptr,
    start,
    tile,
    rows,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_LOGIT_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    label = tl.load(labels_ptr + r, mask=row_mask, other=-1) - start
    running_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_R], tl.float32)
    target = tl.zeros([BLOCK_R], tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, tile, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vocabulary_mask = v < tile
        mask = vocabulary_mask[:, None] & row_mask[None, :]
        offsets = v[:, None].to(tl.int64) * rows + r[None, :]
        z, capped = _load_transformed(
            logits_ptr, bias_ptr, offsets, v, mask, vocabulary_mask, scale, softcap, HAS_BIAS, HAS_CAP
        )
        tl.store(logits_ptr + offsets, z, mask=mask)
        total += tl.sum(tl.where(mask, z, 0.0), axis=0)
        target += tl.sum(tl.where(mask & (v[:, None] == label[None, :]), z, 0.0), axis=0)
        new_max = tl.maximum(running_max, tl.max(tl.where(mask, z, float("-inf")), axis=0))
        exps = tl.where(mask, tl.exp(z - new_max[None, :]), 0.0)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(exps, axis=0)
        running_max = new_max
    old_max = tl.load(max_ptr + r, mask=row_mask, other=0.0)
    old_sum = tl.load(sum_ptr + r, mask=row_mask, other=0.0)
    merged_max = tl.maximum(old_max, running_max)
    merged_sum = old_sum * tl.exp(old_max - merged_max) + running_sum * tl.exp(running_max - merged_max)
    tl.store(max_ptr + r, merged_max, mask=row_mask)
    tl.store(sum_ptr + r, merged_sum, mask=row_mask)
    tl.store(target_ptr + r, tl.load(target_ptr + r, mask=row_mask, other=0.0) + target, mask=row_mask)
    if HAS_LOGIT_SUM:
        tl.store(logit_sum_ptr + r, tl.load(logit_sum_ptr + r, mask=row_mask, other=0.0) + total, mask=row_mask)


@triton.jit
def _backward_kernel(
    logits_ptr,
    bias_ptr,
    labels_ptr,
    lse_ptr,
    probability_scale_ptr,
    row_scale_ptr,
    start,
    tile,
    rows,
    scale,
    softcap,
    uniform,
    target_weight,
    HAS_BIAS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    vocabulary_mask = v < tile
    mask = vocabulary_mask[:, None] & row_mask[None, :]
    offsets = v[:, None].to(tl.int64) * rows + r[None, :]
    z, capped = _load_transformed(
        logits_ptr, bias_ptr, offsets, v, mask, vocabulary_mask, scale, softcap, HAS_BIAS, HAS_CAP
    )
    label = tl.load(labels_ptr + r, mask=row_mask, other=-1) - start
    lse = tl.load(lse_ptr + r, mask=row_mask, other=0.0)
    row_scale = tl.load(row_scale_ptr + r, mask=row_mask, other=0.0)
    probability_scale = tl.load(probability_scale_ptr + r, mask=row_mask, other=0.0)
    gradient = tl.exp(z - lse[None, :]) * probability_scale[None, :]
    gradient -= uniform * row_scale[None, :]
    gradient = tl.where(v[:, None] == label[None, :], gradient - target_weight * row_scale[None, :], gradient)
    if HAS_CAP:
        gradient *= 1.0 - capped * capped
    tl.store(logits_ptr + offsets, gradient * scale, mask=mask)


@torch.library.custom_op(
    "memengine::_triton_cross_entropy_tile_forward_",
    mutates_args=("logits", "running_max", "running_sum", "target", "logit_sum"),
)
def triton_cross_entropy_tile_forward_(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    start: int,
    logit_scale: float,
    softcap: float,
    running_max: torch.Tensor,
    running_sum: torch.Tensor,
    target: torch.Tensor,
    logit_sum: torch.Tensor | None,
) -> None:
    check_cross_entropy_tile_forward_args(
        logits, bias, labels, start, softcap, running_max, running_sum, target, logit_sum
    )
    tile, rows = logits.shape
    if tile == 0 or rows == 0:
        return
    _forward_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        logits,
        logits if bias is None else bias.contiguous(),
        labels.contiguous(),
        running_max,
        running_sum,
        target,
        running_max if logit_sum is None else logit_sum,
        start,
        tile,
        rows,
        logit_scale,
        softcap,
        HAS_BIAS=bias is not None,
        HAS_CAP=softcap > 0,
        HAS_LOGIT_SUM=logit_sum is not None,
        BLOCK_V=BLOCK_VOCABULARY,
        BLOCK_R=BLOCK_ROWS,
    )


@torch.library.custom_op("memengine::_triton_cross_entropy_tile_backward_", mutates_args=("logits",))
def triton_cross_entropy_tile_backward_(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    start: int,
    logit_scale: float,
    softcap: float,
    lse: torch.Tensor,
    probability_scale: torch.Tensor,
    row_scale: torch.Tensor,
    uniform: float,
    target_weight: float,
) -> None:
    check_cross_entropy_tile_backward_args(logits, bias, labels, start, softcap, lse, probability_scale, row_scale)
    tile, rows = logits.shape
    if tile == 0 or rows == 0:
        return
    _backward_kernel[(triton.cdiv(tile, BLOCK_VOCABULARY), triton.cdiv(rows, BLOCK_ROWS))](
        logits,
        logits if bias is None else bias.contiguous(),
        labels.contiguous(),
        lse,
        probability_scale,
        row_scale,
        start,
        tile,
        rows,
        logit_scale,
        softcap,
        uniform,
        target_weight,
        HAS_BIAS=bias is not None,
        HAS_CAP=softcap > 0,
        BLOCK_V=BLOCK_VOCABULARY,
        BLOCK_R=BLOCK_ROWS,
    )


triton_cross_entropy_tile_forward_.register_fake(fake.cross_entropy_tile_forward_fake)
triton_cross_entropy_tile_backward_.register_fake(fake.cross_entropy_tile_backward_fake)
