"""Linear + cross-entropy in bounded chunks: a language model's head and loss without vocabulary-sized logits.

    loss_sum, tokens, lse = linear_cross_entropy_forward(hidden, weight, labels, ...)
    grad_hidden = linear_cross_entropy_backward(grad_loss, hidden, weight, labels, lse, ..., weight_sink=...)

Logits exist one tile at a time: `tile` vocabulary entries x `rows` tokens, chosen from a byte bound
(`chunk_bytes`, default CHUNK_BYTES), never the whole [tokens, vocabulary] matrix. Every matrix product is
wgrad_accumulate_ (C (+)= G^T X: bf16/fp16 products summed in fp32, on its compiled CPU and CUDA kernels),
with the tile kept transposed, [tile, rows], so that all three products take that form:
    logits^T  = (W_tile^T)^T (hidden_rows^T)      G = W_tile^T [H, tile], X = hidden_rows^T [H, rows]
    d hidden += (dz^T)^T W_tile                   G = dz^T [tile, rows],  X = W_tile [tile, H]
    dW_tile  += dz^T hidden_rows                  G = dz [rows, tile],    X = hidden_rows [rows, H]
The logits are therefore fp32-accurate (products of bf16 values are exact in fp32) and the softmax runs in
fp32: nothing is rounded to bf16 on the way, unlike a bf16 lm_head whose logits are rounded before the loss.
The logit gradient dz enters the two backward products in the operands' dtype when that is bf16 (rounded
as a bf16 model's own logit gradient is; bf16 keeps fp32's exponent range) and in fp32 otherwise. The
forward keeps, per token, only the log-sum-exp; the backward recomputes each tile's logits
(recompute-in-backward: the head's weight gradient must be scaled by the gradient of the loss, known only
in backward, and go into the fp32 buffer with no vocabulary-sized temporary) and hands each tile's logit
gradient to `weight_sink`, which accumulates the weight gradient (memengine's buffer: into main_grad).
Everything between the products is one op per tile: cross_entropy_tile_forward_ (transform, online
log-sum-exp, the label's logit) and cross_entropy_tile_backward_ (the logit gradient, in place), with
compiled CPU, CUDA and Triton kernels.

Per token t with label y (tokens labelled ignore_index carry no loss and get no gradient), logits are
z = transform(h_t W^T + b): times logit_scale, then, with softcap c, c * tanh(z / c) (Gemma 2's
final_logit_softcapping). The loss is, as torch.nn.functional.cross_entropy(label_smoothing=eps) plus an
optional z-loss: (1 - eps) (lse - z_y) + eps (lse - mean_v z_v) + z_loss * lse^2, summed over tokens.
"""

import torch

from memengine.ops.functions import cross_entropy_tile_backward_, cross_entropy_tile_forward_, wgrad_accumulate_

CHUNK_BYTES = 16 * 2**20  # one tile's fp32 logits and their gradient, with the operands' transposed copies


def tiling(tokens, vocabulary, hidden, chunk_bytes=None):
    """(rows per chunk, vocabulary entries per tile): the weight tile's transposed copy about a quarter of
    chunk_bytes (at 4 bytes an element), the logits tile (fp32) and its gradient about half of it together."""
    budget = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if budget < 1:
        raise ValueError(f"linear_cross_entropy: chunk_bytes must be positive, got {chunk_bytes}")
    tile = max(1, min(vocabulary, budget // (16 * max(hidden, 1))))
    rows = max(1, min(max(tokens, 1), budget // (16 * tile)))
    return rows, tile


def check_arguments(hidden, weight, labels, bias, label_smoothing, softcap, logit_scale, z_loss):
    """Raises ValueError/TypeError naming the argument and the fix."""
    name = "linear_cross_entropy"
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        raise TypeError(f"{name}: hidden, weight and labels must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [vocabulary, hidden], got shape {list(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden's last dimension must equal weight.shape[1] = {weight.shape[1]}, got hidden of shape "
            f"{list(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: labels of shape {list(labels.shape)} must have hidden's shape without its last dimension, "
            f"{list(hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: labels must be int64 or int32 token ids, got {labels.dtype}")
    supported = (torch.float32, torch.bfloat16, torch.float16)
    if hidden.dtype not in supported or weight.dtype not in supported:
        raise TypeError(
            f"{name}: hidden and weight must be float32, bfloat16 or float16, got {hidden.dtype} and {weight.dtype} "
            "(for float64, compute the loss from the logits: memengine.causal_lm_loss(..., fused=False))"
        )
    if bias is not None and (bias.shape != (weight.shape[0],)):
        raise ValueError(f"{name}: bias must be [vocabulary] = [{weight.shape[0]}], got {list(bias.shape)}")
    for tensor_name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {tensor_name} is on {t.device} but hidden is on {hidden.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be positive (or None), got {softcap}")
    if not logit_scale > 0:
        raise ValueError(f"{name}: logit_scale must be positive, got {logit_scale}")
    if z_loss < 0:
        raise ValueError(f"{name}: z_loss must be non-negative, got {z_loss}")


def _product_dtype(hidden, weight):
    """The dtype the tiles' products take their operands in: theirs when they agree, else fp32."""
    return hidden.dtype if hidden.dtype == weight.dtype else torch.float32


def _raw_logits(hidden_rows, weight_tile, dtype):
    """A tile's raw fp32 logits, transposed ([tile, rows]), from the rows' hidden states ([rows, H], `dtype`):
    products of `dtype` values summed in fp32 (wgrad_accumulate_, whose CPU kernels read the .t() views of
    both operands where they lie)."""
    logits = torch.empty(weight_tile.shape[0], hidden_rows.shape[0], dtype=torch.float32, device=hidden_rows.device)
    wgrad_accumulate_(logits, weight_tile.to(dtype).t(), hidden_rows.t(), overwrite=True)
    return logits


def _bias_tile(bias, start, end):
    return None if bias is None else bias[start:end].to(torch.float32)


def _token_labels(labels, vocabulary, ignore_index, counted):
    """labels flattened as int64. A counted label outside [0, vocabulary) raises (torch's cross_entropy does too;
    it would otherwise pick no logit and give a wrong loss): on the CPU at once; on an accelerator, where the
    check would wait for the device, the token's loss is made NaN instead, which every training loop (memengine's
    Engine included) reports as a non-finite loss."""
    labels = labels.reshape(-1).to(torch.int64)
    invalid = counted & ((labels < 0) | (labels >= vocabulary))
    if labels.device.type == "cpu" and bool(invalid.any()):
        bad = labels[invalid][0].item()
        raise ValueError(
            f"linear_cross_entropy: label {bad} is outside the vocabulary [0, {vocabulary}) and is not ignore_index "
            f"({ignore_index})"
        )
    return labels, invalid


def linear_cross_entropy_forward(
    hidden,
    weight,
    labels,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    softcap=None,
    logit_scale=1.0,
    z_loss=0.0,
    chunk_bytes=None,
):
    """(loss sum: fp32 0-dim, number of tokens not labelled ignore_index: int64 0-dim, log-sum-exp per token:
    fp32 [tokens]) of the flattened tokens. hidden [..., H], weight [V, H], labels [...], bias [V] or None."""
    check_arguments(hidden, weight, labels, bias, label_smoothing, softcap, logit_scale, z_loss)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    tokens, vocabulary = labels.numel(), weight.shape[0]
    counted = labels.reshape(-1) != ignore_index
    labels, invalid = _token_labels(labels, vocabulary, ignore_index, counted)
    rows, tile = tiling(tokens, vocabulary, hidden.shape[1], chunk_bytes)
    dtype = _product_dtype(hidden, weight)
    lse = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, tokens, rows):
        r1 = min(tokens, r0 + rows)
        hidden_rows = hidden[r0:r1].to(dtype)
        chunk_labels = labels[r0:r1]
        # Online log-sum-exp over the vocabulary tiles, with the label's logit and (label smoothing) the sum.
        running_max = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        running_sum = torch.zeros(r1 - r0, device=hidden.device)
        target = torch.zeros(r1 - r0, device=hidden.device)
        logit_sum = torch.zeros(r1 - r0, device=hidden.device) if label_smoothing else None
        for v0 in range(0, vocabulary, tile):
            v1 = min(vocabulary, v0 + tile)
            cross_entropy_tile_forward_(
                _raw_logits(hidden_rows, weight[v0:v1], dtype),
                chunk_labels,
                v0,
                running_max,
                running_sum,
                target,
                logit_sum,
                bias=_bias_tile(bias, v0, v1),
                logit_scale=logit_scale,
                softcap=softcap,
            )
        chunk_lse = running_max + torch.log(running_sum)
        lse[r0:r1] = chunk_lse
        per_token = (1.0 - label_smoothing) * (chunk_lse - target)
        if label_smoothing:
            per_token = per_token + label_smoothing * (chunk_lse - logit_sum / vocabulary)
        if z_loss:
            per_token = per_token + z_loss * chunk_lse * chunk_lse
        per_token = torch.where(invalid[r0:r1], float("nan"), per_token)
        loss_sum += torch.where(counted[r0:r1], per_token, 0.0).sum()
    return loss_sum, counted.sum(), lse


def linear_cross_entropy_backward(
    grad_loss,
    hidden,
    weight,
    labels,
    lse,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    softcap=None,
    logit_scale=1.0,
    z_loss=0.0,
    chunk_bytes=None,
    weight_sink=None,
    bias_sink=None,
    need_hidden=True,
):
    """The gradient w.r.t. hidden (hidden's dtype and shape; None unless need_hidden) of grad_loss * loss_sum.
    Tile by tile, weight_sink(first, start, end, dz [rows, tile], hidden rows [rows, H]) gets what the weight
    rows [start, end) need (their gradient is dz^T @ hidden rows; first: the first part of those rows in
    this call; both operands in one dtype, as wgrad_accumulate_ takes them) and bias_sink(first, start, end,
    dz) the bias's (the sum of dz's rows); None: not wanted."""
    shape = hidden.shape
    hidden = hidden.reshape(-1, shape[-1])
    tokens, vocabulary = labels.numel(), weight.shape[0]
    counted = labels.reshape(-1) != ignore_index
    labels = labels.reshape(-1).to(torch.int64)
    rows, tile = tiling(tokens, vocabulary, hidden.shape[1], chunk_bytes)
    dtype = _product_dtype(hidden, weight)
    # The logit gradient goes into the products in bf16 (as a bf16 model's own does); fp16 would underflow.
    gradient_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    grad_loss = grad_loss.to(torch.float32)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    for r0 in range(0, tokens, rows):
        r1 = min(tokens, r0 + rows)
        hidden_rows = hidden[r0:r1].to(dtype)
        # d loss / d z = p (1 + 2 z_loss lse) - (1 - eps) onehot(y) - eps / V, zero for ignored tokens; times
        # the loss's gradient.
        row_scale = torch.where(counted[r0:r1], grad_loss, 0.0)
        probability_scale = (1.0 + 2.0 * z_loss * lse[r0:r1]) * row_scale if z_loss else row_scale
        for v0 in range(0, vocabulary, tile):
            v1 = min(vocabulary, v0 + tile)
            grad = _raw_logits(hidden_rows, weight[v0:v1], dtype)
            cross_entropy_tile_backward_(
                grad,
                labels[r0:r1],
                v0,
                lse[r0:r1],
                probability_scale,
                row_scale,
                uniform=label_smoothing / vocabulary,
                target_weight=1.0 - label_smoothing,
                bias=_bias_tile(bias, v0, v1),
                logit_scale=logit_scale,
                softcap=softcap,
            )
            low = grad.to(gradient_dtype)
            if grad_hidden is not None:
                wgrad_accumulate_(grad_hidden[r0:r1], low, weight[v0:v1].to(gradient_dtype), overwrite=v0 == 0)
            if weight_sink is not None:
                weight_sink(r0 == 0, v0, v1, low.t(), hidden_rows.to(gradient_dtype))
            if bias_sink is not None:
                bias_sink(r0 == 0, v0, v1, grad.t())
    return None if grad_hidden is None else grad_hidden.to(hidden.dtype).reshape(shape)
