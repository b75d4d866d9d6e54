"""The pure-PyTorch reference kernels of memengine's ops: registered for every device (so an op
exists even without the compiled extension), and the oracle of the tests and the baseline of
the benchmarks. Named <op without its trailing underscore>_reference_.
"""

import torch

from memengine.ops.validation import (
    check_accumulate_args,
    check_bias_grad_args,
    check_clip_args,
    check_cross_entropy_tile_backward_args,
    check_cross_entropy_tile_forward_args,
    check_grad_stats_args,
    check_multi_accumulate_args,
    check_wgrad_args,
)


def accumulate_reference_(dst, src, alpha=1.0, alpha_tensor=None, overwrite=False):
    """dst <- (0 if overwrite else dst) + alpha * float(src), in eager PyTorch."""
    check_accumulate_args(dst, src, alpha_tensor)
    _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite)


def multi_accumulate_reference_(dsts, srcs, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_multi_accumulate_args(dsts, srcs, alpha_tensor)
    for dst, src in zip(dsts, srcs, strict=True):
        _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite)


def _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite):
    if dst.numel() == 0:
        return
    if alpha_tensor is None:
        if overwrite:
            torch.mul(src.to(torch.float32), alpha, out=dst)
        else:
            dst.add_(src, alpha=alpha)
        return
    scaled = src.to(torch.float32) * alpha_tensor.to(dst.device)
    if overwrite:
        dst.copy_(scaled)
    else:
        dst.add_(scaled)


def bias_grad_accumulate_reference_(main_grad, grad_output, alpha=1.0, alpha_tensor=None, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * grad_output summed over all rows, in float32."""
    check_bias_grad_args(main_grad, grad_output, alpha_tensor)
    column_sums = grad_output.reshape(-1, main_grad.shape[0]).to(torch.float32).sum(0)
    _accumulate_pair_reference(main_grad, column_sums, alpha, alpha_tensor, overwrite)


def wgrad_accumulate_reference_(main_grad, grad_output, input, alpha=1.0, alpha_tensor=None, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * grad_output^T @ input, with both
    flattened to [tokens, features]; products and sums in float32 (inputs are upcast first)."""
    check_wgrad_args(main_grad, grad_output, input, alpha_tensor)
    out_features, in_features = main_grad.shape
    if main_grad.numel() == 0:
        return
    g2 = grad_output.reshape(-1, out_features).to(torch.float32)
    x2 = input.reshape(-1, in_features).to(torch.float32)
    _accumulate_pair_reference(main_grad, g2.t() @ x2, alpha, alpha_tensor, overwrite)


def grad_stats_reference_(flat, scale=1.0, scale_tensor=None):
    """flat *= scale; returns float32 [L2 norm of the finite values (computed in float64),
    number of non-finite values], without leaving the device. A norm beyond float32's range
    is +inf and counts as one more non-finite value (grad_stats_result)."""
    check_grad_stats_args(flat, scale_tensor)
    flat.mul_(scale if scale_tensor is None else scale_tensor.to(flat.device))
    finite = torch.isfinite(flat)
    norm = torch.linalg.vector_norm(torch.where(finite, flat, 0.0), dtype=torch.float64)
    return grad_stats_result(norm, finite.numel() - finite.sum())


def grad_stats_result(norm, nonfinite):
    """grad_stats_'s float32 [norm, non-finite count] from the float64 norm of the finite values
    and their (0-dim tensor) count, on the device (shared with the Triton kernel; the compiled
    kernels' finish_grad_stats in csrc/include/memengine/grad_stats.h does the same).

    A norm float32 cannot represent (> its largest value, including norms just above it that a
    cast would round down to that value) is +inf and counts as one more non-finite value, so that
    everything that skips the step on stats[1] > 0 (clip_, Engine.step) skips it: clipping by
    max_norm / inf = 0 would step with a zeroed gradient."""
    unrepresentable = norm > torch.finfo(torch.float32).max
    norm = torch.where(unrepresentable, float("inf"), norm)
    return torch.stack([norm.to(torch.float32), (nonfinite + unrepresentable).to(torch.float32)])


def clip_reference_(flat, stats, max_norm):
    """flat *= min(1, max_norm / (norm + 1e-6)) unless stats counted a non-finite value or the
    norm is not finite (then the buffer is left as it is)."""
    check_clip_args(flat, stats, max_norm)
    coefficient = torch.clamp(max_norm / (stats[0] + 1e-6), max=1.0)
    skip = (stats[1] > 0) | ~torch.isfinite(stats[0])
    flat.mul_(torch.where(skip, torch.ones_like(coefficient), coefficient))


def _labels_in_tile(labels, start, tile):
    """(mask of rows whose label lies in the tile [start, start + tile), the label's index in it (0 elsewhere))."""
    index = labels - start
    inside = (index >= 0) & (index < tile)
    return inside, torch.where(inside, index, 0)


def _transform_logits_(logits, bias, logit_scale, softcap, keep_capped):
    """logits <- (logits + bias) * logit_scale, then softcap * tanh(. / softcap) with a cap, in place; returns
    tanh(. / softcap) (a new tensor) when keep_capped and there is a cap, else None."""
    if bias is not None:
        logits += bias[:, None]
    if logit_scale != 1.0:
        logits *= logit_scale
    if not softcap:
        return None
    if not keep_capped:
        logits.div_(softcap).tanh_().mul_(softcap)
        return None
    capped = torch.tanh(logits / softcap)
    torch.mul(capped, softcap, out=logits)
    return capped


def cross_entropy_tile_forward_reference_(
    logits, bias, labels, start, logit_scale, softcap, running_max, running_sum, target, logit_sum
):
    """One vocabulary tile of a cross-entropy's forward (csrc/include/memengine/cross_entropy_tile.h has the
    formulas): logits [tile, rows] (raw, transposed) become the transformed logits z; per row, the label's z
    (when the label lies in the tile) is added to target, the sum of z to logit_sum (unless None), and the
    tile's log-sum-exp is merged into the running (maximum, sum)."""
    check_cross_entropy_tile_forward_args(
        logits, bias, labels, start, softcap, running_max, running_sum, target, logit_sum
    )
    tile, rows = logits.shape
    if tile == 0 or rows == 0:
        return
    _transform_logits_(logits, bias, logit_scale, softcap, keep_capped=False)
    inside, index = _labels_in_tile(labels, start, tile)
    target += torch.where(inside, logits.gather(0, index[None, :]).squeeze(0), 0.0)
    if logit_sum is not None:
        logit_sum += logits.sum(0)
    tile_max = logits.max(0).values
    tile_sum = torch.exp(logits - tile_max[None, :]).sum(0)
    new_max = torch.maximum(running_max, tile_max)
    running_sum.copy_(running_sum * torch.exp(running_max - new_max) + tile_sum * torch.exp(tile_max - new_max))
    running_max.copy_(new_max)


def cross_entropy_tile_backward_reference_(
    logits, bias, labels, start, logit_scale, softcap, lse, probability_scale, row_scale, uniform, target_weight
):
    """One vocabulary tile of a cross-entropy's backward: logits [tile, rows] (raw, transposed) become the
    gradient of the loss w.r.t. them (memengine::logit_gradient in csrc/include/memengine/cross_entropy_tile.h)."""
    check_cross_entropy_tile_backward_args(logits, bias, labels, start, softcap, lse, probability_scale, row_scale)
    tile, rows = logits.shape
    if tile == 0 or rows == 0:
        return
    capped = _transform_logits_(logits, bias, logit_scale, softcap, keep_capped=True)
    gradient = logits.sub_(lse[None, :]).exp_().mul_(probability_scale[None, :])
    if uniform:
        gradient -= uniform * row_scale[None, :]
    inside, index = _labels_in_tile(labels, start, tile)
    gradient.scatter_add_(0, index[None, :], (-target_weight * row_scale * inside)[None, :])
    if capped is not None:
        gradient *= capped.mul_(capped).neg_().add_(1.0)
    if logit_scale != 1.0:
        gradient *= logit_scale
