"""embedding_grad_accumulate_: an embedding's weight gradient added straight into an fp32 buffer.

    main_grad[index[t]] (+)= alpha * float(grad_output[t]) for every token t whose index is not padding_idx

Rows of repeated tokens are summed in fp32 (index_add_ into the fp32 buffer), never in the gradient's
bf16/fp16; no dense [vocabulary, hidden] gradient exists, only one bounded chunk of the tokens' gradients
in fp32 (CHUNK_BYTES). overwrite: the buffer's old values are ignored (zeroed first), as the first
contribution of an accumulation window. This is the pure-PyTorch form; compiled kernels would replace the
chunk loop, not the contract.
"""

import torch

CHUNK_BYTES = 8 * 2**20


def embedding_grad_accumulate_(main_grad, index, grad_output, padding_idx=None, alpha=1.0, overwrite=False):
    name = "embedding_grad_accumulate_"
    if main_grad.dtype != torch.float32 or main_grad.dim() != 2:
        raise ValueError(
            f"{name}: main_grad must be a float32 [vocabulary, hidden] buffer, got {main_grad.dtype} "
            f"of shape {list(main_grad.shape)}"
        )
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: index must hold int64 or int32 token ids, got {index.dtype}")
    if grad_output.shape != (*index.shape, main_grad.shape[1]):
        raise ValueError(
            f"{name}: grad_output of shape {list(grad_output.shape)} must be index's shape "
            f"{list(index.shape)} plus the hidden size {main_grad.shape[1]}"
        )
    if overwrite:
        main_grad.zero_()
    index = index.reshape(-1)
    rows = grad_output.reshape(-1, main_grad.shape[1])
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += main_grad.shape[0]
        keep = index != padding_idx
        index, rows = index[keep], rows[keep]
    chunk = max(1, CHUNK_BYTES // (4 * max(main_grad.shape[1], 1)))
    for start in range(0, index.numel(), chunk):
        part = rows[start : start + chunk].to(torch.float32)
        if not (isinstance(alpha, float) and alpha == 1.0):
            part = part * alpha
        main_grad.index_add_(0, index[start : start + chunk], part)
