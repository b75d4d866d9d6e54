import os

import torch

# Without a GPU, the Triton kernels are tested on CPU tensors by Triton's interpreter. The
# variable must be set before triton.jit runs, i.e. before memengine is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import memengine  # noqa: E402,F401
from memengine.ops import backend as _backend
from memengine.ops import extension as _extension  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; this machine has none")


def backends_for(device_type, op="accumulate_"):
    """pytest params for every backend, skipped with the reason when it cannot run here."""
    params = []
    for backend in _backend.BACKENDS:
        reason = _backend.unavailable_reason(backend, op, device_type)
        marks = [pytest.mark.skip(reason=f"{backend} backend unavailable: {reason}")] if reason else []
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


@pytest.fixture
def use_backend(monkeypatch):
    def use(backend):
        monkeypatch.setenv(_backend.ENV_VAR, backend)

    return use


def cpu_isas():
    """pytest params for each CPU instruction set of the C++ kernels."""
    order = ["scalar", "avx2", "avx512"]
    best = _extension.build_info()["cpu_isa_supported"] if _extension.C is not None else None
    params = []
    for isa in order:
        reason = None
        if best is None:
            reason = f"memengine._C is not loaded ({_extension.load_error})"
        elif order.index(isa) > order.index(best):
            reason = f"this CPU supports at most {best}"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(isa, marks=marks, id=isa))
    return params


@pytest.fixture
def cpu_isa(request):
    """Pins the C++ CPU kernels to one ISA for the test, restoring the previous one after."""
    previous = _extension.C.cpu_isa()
    _extension.C.set_cpu_isa(request.param)
    yield request.param
    _extension.C.set_cpu_isa(previous)
