"""The one place where memengine chooses which kernel runs an op.

Backends, fastest first:
  cpp     compiled C++ (CPU) and CUDA kernels from memengine._C, through the dispatcher
  triton  Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  torch   the pure-PyTorch reference kernels in memengine/ops/reference.py

MEMENGINE_BACKEND=auto (default) takes the first backend available for the tensors' device
(on CPU tensors only cpp or torch: Triton's interpreter is for testing, not speed).
Naming a backend forces it; if it cannot run, the call raises and says why.
"""

import os

import torch

from memengine.ops import extension

BACKENDS = ("cpp", "triton", "torch")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MEMENGINE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""


def requested_backend():
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def _cpp_unavailable_reason(op, device_type):
    if extension.C is None:
        return f"the compiled extension memengine._C is not loaded ({extension.load_error})"
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None:
        return f"memengine._C has no kernels for {device_type} tensors"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"memengine::{op}", dispatch_key):
        if dispatch_key == "CUDA":
            return "memengine._C was built without CUDA kernels (CPU-only build)"
        return f"memengine._C registers no {dispatch_key} kernel for memengine::{op}"
    return None


def unavailable_reason(backend, op, device_type):
    """None if `backend` can run `op` on `device_type` tensors, else why not."""
    if backend == "torch":
        return None
    if backend == "cpp":
        return _cpp_unavailable_reason(op, device_type)
    from memengine import triton as triton_backend

    return triton_backend.unavailable_reason(op, device_type)


_selected = {}
# os.environ.get costs about 0.75 us per call (it encodes the key); reading CPython's
# underlying dict directly costs about 0.05 us, and it is what os.environ itself updates.
_environ = getattr(os.environ, "_data", None)
if isinstance(_environ, dict) and os.name == "posix":
    _ENV_VAR_KEY, _INTERPRET_KEY = os.fsencode(ENV_VAR), os.fsencode("TRITON_INTERPRET")
else:  # other platforms or implementations: the portable path
    _environ, _ENV_VAR_KEY, _INTERPRET_KEY = os.environ, ENV_VAR, "TRITON_INTERPRET"


def select(op, device_type):
    """The backend that runs `op` on `device_type` tensors under the current MEMENGINE_BACKEND.

    Memoised on everything the answer depends on, so the per-call cost is two dict lookups
    (small tensors are dominated by such overheads).
    """
    key = (op, device_type, _environ.get(_ENV_VAR_KEY), _environ.get(_INTERPRET_KEY), extension.C)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = _select_uncached(op, device_type)
    return backend


# Under torch.compile the choice is made once, while tracing, and baked into the graph: what
# torch.compiler.assume_constant_result(select) does. That decorator imports torch._dynamo, 1 s of
# `import memengine` (issue 19); all it does is set this attribute, which
# tests/ops/test_backend.py checks against the decorator itself.
select._dynamo_marked_constant = True


def _select_uncached(op, device_type):
    requested = requested_backend()
    if requested == "auto":
        for backend in BACKENDS:
            if backend == "triton" and device_type == "cpu":
                continue  # Triton's CPU interpreter is a debugging aid, never the fast choice
            if unavailable_reason(backend, op, device_type) is None:
                return backend
    reason = unavailable_reason(requested, op, device_type)
    if reason is not None:
        raise BackendUnavailableError(
            f"{ENV_VAR}={requested} cannot run memengine::{op} on {device_type}: {reason}. "
            f"Use {ENV_VAR}=auto to fall back to the fastest available backend."
        )
    return requested


def report(ops, device_types=("cpu", "cuda")):
    """{op: {device_type: backend or 'unavailable: reason'}} for `python -m memengine info`."""
    table = {}
    for op in ops:
        table[op] = {}
        for device_type in device_types:
            try:
                table[op][device_type] = select(op, device_type)
            except BackendUnavailableError as error:
                table[op][device_type] = f"unavailable: {error}"
    return table
