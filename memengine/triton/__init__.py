"""Triton kernels: an alternative GPU backend, registered as private ops memengine::_triton_*.

On CPU tensors they run only under TRITON_INTERPRET=1 (set before memengine is imported),
which is how the test suite checks them on machines without a GPU.
"""

import os

_import_error = None
try:
    import triton  # noqa: F401
except ImportError as error:  # optional dependency
    _import_error = f"{type(error).__name__}: {error}"

if _import_error is None:
    from memengine.triton import (  # noqa: F401,E402  (registers the ops)
        accumulate,
        bias_grad_accumulate,
        clip,
        cross_entropy_tile,
        grad_stats,
        wgrad_accumulate,
    )

OPS = (
    "accumulate_",
    "multi_accumulate_",
    "bias_grad_accumulate_",
    "grad_stats_",
    "clip_",
    "wgrad_accumulate_",
    "cross_entropy_tile_forward_",
    "cross_entropy_tile_backward_",
)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(op, device_type):
    """None if the Triton backend can run `op` on `device_type` tensors, else why not."""
    if _import_error is not None:
        return f"triton is not installed ({_import_error}); pip install triton"
    if op not in OPS:
        return f"no Triton kernel for memengine::{op}"
    if device_type == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device_type == "cpu":
        return None if interpreting() else "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton kernels do not run on {device_type} tensors"
