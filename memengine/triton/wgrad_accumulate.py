"""Triton kernel of wgrad_accumulate_:  main_grad <- (overwrite ? 0 : main_grad) + alpha * G^T X.

Each program owns a [BLOCK_M, BLOCK_N] tile of main_grad (out x in features) and walks the tokens
in BLOCK_K steps with tl.dot into a float32 accumulator (IEEE, no tf32), so the product is never
rounded to the input dtype; the epilogue applies alpha (read on the device) with one fused multiply-add.
Under the interpreter bf16 tiles are upcast before tl.dot (its bf16 dot is wrong; bf16 products are exact in fp32).
"""

import torch
import triton
import triton.language as tl

from memengine import triton as backend  # the package is still initialising: call interpreting() at run time
from memengine.ops import fake
from memengine.ops.validation import check_wgrad_args

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K = 16, 16, 16  # small tiles keep the interpreter fast


@triton.jit
def _wgrad_kernel(
    main_grad_ptr,
    g_ptr,
    x_ptr,
    alpha_ptr,
    alpha_value,
    tokens,
    out_features,
    in_features,
    main_grad_stride,
    g_stride,
    x_stride,
    ALPHA_FROM_TENSOR: tl.constexpr,
    OVERWRITE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # out features; 64-bit offsets
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # in features
    row_mask = rows < out_features
    col_mask = cols < in_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, tokens, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = ks < tokens
        g = tl.load(
            g_ptr + ks[:, None] * g_stride + rows[None, :], mask=k_mask[:, None] & row_mask[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_M]
        x = tl.load(
            x_ptr + ks[:, None] * x_stride + cols[None, :], mask=k_mask[:, None] & col_mask[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_N]
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision="ieee", out_dtype=tl.float32)
    if ALPHA_FROM_TENSOR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = tl.cast(alpha_value, tl.float32)  # the interpreter would otherwise keep a Python float in fp64
    offsets = rows[:, None] * main_grad_stride + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if OVERWRITE:
        result = alpha * acc
    else:
        result = tl.fma(alpha, acc, tl.load(main_grad_ptr + offsets, mask=mask))
    tl.store(main_grad_ptr + offsets, result, mask=mask)


@torch.library.custom_op("memengine::_triton_wgrad_accumulate_", mutates_args=("main_grad",))
def triton_wgrad_accumulate_(
    main_grad: torch.Tensor,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    alpha: float = 1.0,
    alpha_tensor: torch.Tensor | None = None,
    overwrite: bool = False,
) -> None:
    check_wgrad_args(main_grad, grad_output, input, alpha_tensor)
    out_features, in_features = main_grad.shape
    if main_grad.numel() == 0:
        return
    g2 = grad_output.reshape(-1, out_features)
    x2 = input.reshape(-1, in_features)
    tokens = g2.shape[0]
    if tokens == 0:
        if overwrite:
            main_grad.zero_()
        return
    if g2.stride(1) != 1:
        g2 = g2.contiguous()
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    alpha_tensor = alpha_tensor.to(main_grad.device) if alpha_tensor is not None else None
    interpret = backend.interpreting()
    block_m, block_n, block_k = (
        (INTERPRET_BLOCK_M, INTERPRET_BLOCK_N, INTERPRET_BLOCK_K) if interpret else (BLOCK_M, BLOCK_N, BLOCK_K)
    )
    grid = (triton.cdiv(out_features, block_m), triton.cdiv(in_features, block_n))
    _wgrad_kernel[grid](
        main_grad,
        g2,
        x2,
        alpha_tensor if alpha_tensor is not None else main_grad,
        float(alpha),
        tokens,
        out_features,
        in_features,
        main_grad.stride(0),
        g2.stride(0),
        x2.stride(0),
        ALPHA_FROM_TENSOR=alpha_tensor is not None,
        OVERWRITE=bool(overwrite),
        UPCAST=interpret and g2.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


# Same shape/dtype/device checks as the public op when traced with fake tensors.
triton_wgrad_accumulate_.register_fake(fake.wgrad_accumulate_fake)
