"""Triton kernel of accumulate_ / multi_accumulate_:  dst <- (overwrite ? 0 : dst) + alpha * float(src).

Same arithmetic as memengine/accumulate.h: one fused multiply-add, or one multiply when
overwriting. Strided operands go through dense temporaries, like the CUDA kernel.
"""

import torch
import triton
import triton.language as tl

from memengine.ops import fake
from memengine.ops.validation import check_accumulate_args, check_multi_accumulate_args

BLOCK_SIZE = 4096


@triton.jit
def _accumulate_kernel(
    dst_ptr,
    src_ptr,
    alpha_ptr,
    alpha_value,
    n,
    ALPHA_FROM_TENSOR: tl.constexpr,
    OVERWRITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: n may exceed 2**31
    mask = offsets < n
    if ALPHA_FROM_TENSOR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = tl.cast(alpha_value, tl.float32)  # the interpreter would otherwise keep a Python float in fp64
    src = tl.load(src_ptr + offsets, mask=mask).to(tl.float32)
    if OVERWRITE:
        result = alpha * src
    else:
        result = tl.fma(alpha, src, tl.load(dst_ptr + offsets, mask=mask))
    tl.store(dst_ptr + offsets, result, mask=mask)


def launch_accumulate(dst, src, alpha, alpha_tensor, overwrite):
    if dst.numel() == 0:
        return
    dense_dst = dst if dst.is_contiguous() else dst.contiguous()
    alpha_tensor = alpha_tensor.to(dst.device) if alpha_tensor is not None else None
    n = dense_dst.numel()
    _accumulate_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        dense_dst,
        src.contiguous(),
        alpha_tensor if alpha_tensor is not None else dense_dst,
        float(alpha),
        n,
        ALPHA_FROM_TENSOR=alpha_tensor is not None,
        OVERWRITE=bool(overwrite),
        BLOCK=BLOCK_SIZE,
    )
    if dense_dst is not dst:
        dst.copy_(dense_dst)


@torch.library.custom_op("memengine::_triton_accumulate_", mutates_args=("dst",))
def triton_accumulate_(
    dst: torch.Tensor,
    src: torch.Tensor,
    alpha: float = 1.0,
    alpha_tensor: torch.Tensor | None = None,
    overwrite: bool = False,
) -> None:
    check_accumulate_args(dst, src, alpha_tensor)
    launch_accumulate(dst, src, alpha, alpha_tensor, overwrite)


@torch.library.custom_op("memengine::_triton_multi_accumulate_", mutates_args=("dsts",))
def triton_multi_accumulate_(
    dsts: list[torch.Tensor],
    srcs: list[torch.Tensor],
    alpha: float = 1.0,
    alpha_tensor: torch.Tensor | None = None,
    overwrite: bool = False,
) -> None:
    check_multi_accumulate_args(dsts, srcs, alpha_tensor)
    for dst, src in zip(dsts, srcs, strict=True):
        launch_accumulate(dst, src, alpha, alpha_tensor, overwrite)


# Same shape/dtype/device checks as the public ops when traced with fake tensors.
triton_accumulate_.register_fake(fake.accumulate_fake)
triton_multi_accumulate_.register_fake(fake.multi_accumulate_fake)
