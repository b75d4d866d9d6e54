"""Public kernel functions. Each runs on the backend chosen by memengine.ops.backend.select."""

import torch

from memengine.ops import backend as backend_selection
from memengine.ops import reference

OPS = (
    "accumulate_",
    "multi_accumulate_",
    "wgrad_accumulate_",
    "bias_grad_accumulate_",
    "grad_stats_",
    "clip_",
    "cross_entropy_tile_forward_",
    "cross_entropy_tile_backward_",
)


_implementations = {}


def _implementation(op, backend):
    """The compiled op memengine::<op>, the Triton op memengine::_triton_<op>, or the reference
    kernel reference.<op without the trailing _>_reference_."""
    if backend == "cpp":
        return getattr(torch.ops.memengine, op).default
    if backend == "triton":
        return getattr(torch.ops.memengine, "_triton_" + op).default
    return getattr(reference, op[:-1] + "_reference_")


def _run(op, device_type, *args):
    """Runs `op` on the backend backend.select picks. The callable is looked up once per
    (op, backend): resolving torch.ops attributes on every call cost about 1 us."""
    backend = backend_selection.select(op, device_type)
    function = _implementations.get((op, backend))
    if function is None:
        function = _implementations[(op, backend)] = _implementation(op, backend)
    return function(*args)


def _split_alpha(alpha):
    """(alpha float, alpha tensor or None) as the schemas take them."""
    if isinstance(alpha, torch.Tensor):
        return 1.0, alpha
    return float(alpha), None


def accumulate_(dst, src, alpha=1.0, overwrite=False):
    """dst <- (0 if overwrite else dst) + alpha * float(src), in place; returns None.

    dst: float32. src: same shape, float32, bfloat16 or float16, same device.
    alpha: a Python float, or a 0-dim float32 tensor on dst's device (read on the device:
    no host synchronisation). With alpha == 1 the result is bit-identical to dst.add_(src).
    """
    alpha_value, alpha_tensor = _split_alpha(alpha)
    _run("accumulate_", dst.device.type, dst, src, alpha_value, alpha_tensor, overwrite)


def multi_accumulate_(dsts, srcs, alpha=1.0, overwrite=False):
    """accumulate_ for many (dst, src) pairs at once (one kernel launch per few dozen on CUDA).

    Destinations must not overlap one another. alpha and overwrite apply to every pair.
    """
    dsts, srcs = list(dsts), list(srcs)
    if not dsts and not srcs:
        return
    alpha_value, alpha_tensor = _split_alpha(alpha)
    device = (dsts or srcs)[0].device
    _run("multi_accumulate_", device.type, dsts, srcs, alpha_value, alpha_tensor, overwrite)


def wgrad_accumulate_(main_grad, grad_output, input, alpha=1.0, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * grad_output^T @ input: the weight
    gradient of a Linear layer, accumulated into its fp32 gradient buffer.

    main_grad: float32 [out, in], row-major (a contiguous tensor or a row/column slice of one).
    grad_output [..., out] and input [..., in]: the same dtype (bfloat16, float16 or float32) and
    the same number of tokens (leading dimensions are flattened, without a copy when possible).
    Products and sums are float32: the product is never rounded to the input dtype, and no
    [out, in] temporary is allocated by the C++ and CUDA kernels. Zero tokens: nothing to add
    (with overwrite, main_grad is zeroed). alpha: a Python float or a 0-dim float32 tensor.
    """
    alpha_value, alpha_tensor = _split_alpha(alpha)
    _run(
        "wgrad_accumulate_", main_grad.device.type, main_grad, grad_output, input, alpha_value, alpha_tensor, overwrite
    )


def bias_grad_accumulate_(main_grad, grad_output, alpha=1.0, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * (grad_output summed over all rows).

    main_grad: float32 [out]. grad_output: [..., out], float32, bfloat16 or float16. The sums are
    formed in float32 or better (never in grad_output's dtype) in a fixed order: deterministic.
    alpha: a Python float or a 0-dim float32 tensor (read on the device).
    """
    alpha_value, alpha_tensor = _split_alpha(alpha)
    _run("bias_grad_accumulate_", main_grad.device.type, main_grad, grad_output, alpha_value, alpha_tensor, overwrite)


def grad_stats_(flat, scale=1.0):
    """flat *= scale in place; returns a float32 tensor [2] on flat's device:
    (L2 norm of the scaled finite values, number of non-finite values).

    One pass over memory, deterministic (the same input gives the same bits on every call),
    and no host synchronisation: `scale` may be a 0-dim float32 device tensor such as
    1/num_tokens or 1/loss_scale. Non-finite values are counted and left out of the norm.
    When the norm of the finite values is beyond float32's range (their float64 sum of squares
    has a square root above torch.finfo(torch.float32).max), the norm is +inf and the count is
    one higher: a step that skips on stats[1] > 0 skips it as it would a non-finite value.
    """
    scale_value, scale_tensor = _split_alpha(scale)
    return _run("grad_stats_", flat.device.type, flat, scale_value, scale_tensor)


def grad_stats_in_pieces(pieces):
    """What grad_stats_ returns for a whole buffer, from grad_stats_'s results on pieces of it (ZeRO-1's shards,
    on one rank or summed over ranks): a float64 tensor [sum of squared norms, non-finite values] per piece,
    which add up, and `combine_grad_stats` of their sum. Each piece's norm is squared in float64 (a float32
    square overflows from norms of 1.8e19 on), and the overflow mark grad_stats_ puts on a piece (+inf norm,
    one more in the count) is taken back out of its count, so that the combined result follows grad_stats_'s
    rule once: a whole norm beyond float32's range is +inf and counts as one more non-finite value."""
    total = None
    for stats in pieces:
        norm = stats[0].to(torch.float64)
        part = torch.stack([norm * norm, stats[1].to(torch.float64) - torch.isinf(norm).to(torch.float64)])
        total = part if total is None else total + part
    return total


def combine_grad_stats(summed):
    """grad_stats_'s float32 [norm, non-finite count] from the sum of grad_stats_in_pieces over every piece."""
    return reference.grad_stats_result(summed[0].sqrt(), summed[1])


def clip_(flat, stats, max_norm):
    """flat *= min(1, max_norm / (stats[0] + 1e-6)) unless stats[1] > 0 (a non-finite value:
    the step will be skipped) or stats[0] is not finite; then flat is left as it is. Reads
    `stats` on the device: no host synchronisation."""
    _run("clip_", flat.device.type, flat, stats, float(max_norm))


def cross_entropy_tile_forward_(
    logits, labels, start, running_max, running_sum, target, logit_sum=None, bias=None, logit_scale=1.0, softcap=None
):
    """One vocabulary tile of a cross-entropy's forward, in place; returns None.

    logits: float32 [tile, rows], contiguous: the raw logits of vocabulary entries [start, start + tile) for
    `rows` tokens, transposed. It is overwritten with the transformed logits z = (logits + bias) * logit_scale,
    then softcap * tanh(z / softcap) with a softcap (Gemma 2's final_logit_softcapping). labels: int64 [rows]
    (a label outside the tile, ignore_index included, picks nothing here). Per row (float32 [rows], contiguous):
    target += the label's z when the label lies in the tile; logit_sum += the sum of z (unless None); the tile's
    log-sum-exp is merged into (running_max, running_sum), the online log-sum-exp over the tiles. bias: float32
    [tile] or None. Formulas: csrc/include/memengine/cross_entropy_tile.h.
    """
    _run(
        "cross_entropy_tile_forward_",
        logits.device.type,
        logits,
        bias,
        labels,
        int(start),
        float(logit_scale),
        float(softcap or 0.0),
        running_max,
        running_sum,
        target,
        logit_sum,
    )


def cross_entropy_tile_backward_(
    logits,
    labels,
    start,
    lse,
    probability_scale,
    row_scale,
    uniform=0.0,
    target_weight=1.0,
    bias=None,
    logit_scale=1.0,
    softcap=None,
):
    """One vocabulary tile of a cross-entropy's backward, in place; returns None.

    logits (raw, float32 [tile, rows], contiguous, as cross_entropy_tile_forward_ takes them) is overwritten with
    the gradient of the loss w.r.t. them: (exp(z - lse) * probability_scale - uniform * row_scale - [label]
    target_weight * row_scale) times the transform's derivative. Per row (float32 [rows]): lse, the token's
    log-sum-exp; row_scale, the loss's gradient for the token (0: ignored); probability_scale, row_scale times
    (1 + 2 z_loss lse) with a z-loss. uniform = label_smoothing / vocabulary, target_weight = 1 - label_smoothing.
    """
    _run(
        "cross_entropy_tile_backward_",
        logits.device.type,
        logits,
        bias,
        labels,
        int(start),
        float(logit_scale),
        float(softcap or 0.0),
        lse,
        probability_scale,
        row_scale,
        float(uniform),
        float(target_weight),
    )
