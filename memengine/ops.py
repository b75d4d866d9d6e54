"""Public kernel functions. Each runs on the backend chosen by memengine._backend.select."""

import torch

from memengine import _backend, _ops

OPS = ("accumulate_", "multi_accumulate_")
_CPP_ACCUMULATE = torch.ops.memengine.accumulate_.default


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
    backend = _backend.select("accumulate_", dst.device.type)
    if backend == "cpp":
        _CPP_ACCUMULATE(dst, src, alpha_value, alpha_tensor, overwrite)
    elif backend == "triton":
        torch.ops.memengine._triton_accumulate_(dst, src, alpha_value, alpha_tensor, overwrite)
    else:
        _ops.accumulate_reference_(dst, src, alpha_value, alpha_tensor, overwrite)


def multi_accumulate_(dsts, srcs, alpha=1.0, overwrite=False):
    """accumulate_ for many (dst, src) pairs at once (one kernel launch per few dozen on CUDA).

    Destinations must not overlap one another. alpha and overwrite apply to every pair.
    """
    dsts, srcs = list(dsts), list(srcs)
    if not dsts and not srcs:
        return
    alpha_value, alpha_tensor = _split_alpha(alpha)
    device = (dsts or srcs)[0].device
    backend = _backend.select("multi_accumulate_", device.type)
    if backend == "cpp":
        torch.ops.memengine.multi_accumulate_(dsts, srcs, alpha_value, alpha_tensor, overwrite)
    elif backend == "triton":
        torch.ops.memengine._triton_multi_accumulate_(dsts, srcs, alpha_value, alpha_tensor, overwrite)
    else:
        _ops.multi_accumulate_reference_(dsts, srcs, alpha_value, alpha_tensor, overwrite)
