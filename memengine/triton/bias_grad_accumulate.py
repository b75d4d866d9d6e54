"""Triton kernel of bias_grad_accumulate_: main_grad (+)= alpha * column sums of grad_output.

Programs sum a fixed chunk of rows for a block of columns (groups of 8 rows in float32, group
sums in float64); torch adds the chunk sums in a fixed order and the accumulate_
kernel applies alpha. The chunking depends only on the row count: deterministic.
"""

import torch
import triton
import triton.language as tl

from memengine.ops import fake
from memengine.ops.validation import check_bias_grad_args
from memengine.triton.accumulate import launch_accumulate

ROWS_PER_CHUNK = 256
MAX_CHUNKS = 64
BLOCK_COLUMNS = 128
GROUP_ROWS = 8


@triton.jit
def _column_sums_kernel(
    g_ptr, partial_ptr, rows, columns, row_stride, rows_per_chunk, BLOCK: tl.constexpr, GROUP: tl.constexpr
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_mask = cols < columns
    first = chunk.to(tl.int64) * rows_per_chunk
    end = tl.minimum(first + rows_per_chunk, rows)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    # Groups of GROUP rows are added in float32, group sums in float64 (as the CPU kernel does).
    for start in range(0, rows_per_chunk, GROUP):
        group = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(GROUP):
            row = first + start + k
            values = tl.load(g_ptr + row * row_stride + cols, mask=col_mask & (row < end), other=0.0)
            group += values.to(tl.float32)
        acc += group.to(tl.float64)
    tl.store(partial_ptr + chunk.to(tl.int64) * columns + cols, acc, mask=col_mask)


@torch.library.custom_op("memengine::_triton_bias_grad_accumulate_", mutates_args=("main_grad",))
def triton_bias_grad_accumulate_(
    main_grad: torch.Tensor,
    grad_output: torch.Tensor,
    alpha: float = 1.0,
    alpha_tensor: torch.Tensor | None = None,
    overwrite: bool = False,
) -> None:
    check_bias_grad_args(main_grad, grad_output, alpha_tensor)
    columns = main_grad.shape[0]
    if columns == 0:
        return
    g2 = grad_output.reshape(-1, columns)
    if g2.stride(1) != 1:
        g2 = g2.contiguous()
    rows = g2.shape[0]
    chunks = max(1, min(MAX_CHUNKS, triton.cdiv(rows, ROWS_PER_CHUNK)))
    rows_per_chunk = triton.cdiv(rows, chunks) if rows else 0
    partial = torch.zeros(chunks, columns, dtype=torch.float64, device=main_grad.device)
    if rows:
        grid = (chunks, triton.cdiv(columns, BLOCK_COLUMNS))
        _column_sums_kernel[grid](
            g2, partial, rows, columns, g2.stride(0), rows_per_chunk, BLOCK=BLOCK_COLUMNS, GROUP=GROUP_ROWS
        )
    sums = partial[0].clone()
    for k in range(1, chunks):  # chunk order: deterministic
        sums += partial[k]
    launch_accumulate(main_grad, sums.to(torch.float32), alpha, alpha_tensor, overwrite)


triton_bias_grad_accumulate_.register_fake(fake.bias_grad_accumulate_fake)
