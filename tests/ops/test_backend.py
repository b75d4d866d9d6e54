"""Backend selection, the dispatcher registrations, and import without the compiled extension."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA

import memengine as me
from memengine.ops import backend as _backend
from memengine.ops import extension as _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_loaded_when_required():
    # CI sets MEMENGINE_TEST_REQUIRE_EXTENSION=1 so a broken build cannot pass on the reference kernels.
    if os.environ.get("MEMENGINE_TEST_REQUIRE_EXTENSION") != "1" and _extension.C is None:
        pytest.skip(f"memengine._C not loaded ({_extension.load_error}) and MEMENGINE_TEST_REQUIRE_EXTENSION unset")
    assert _extension.C is not None, _extension.load_error
    for op in me.ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"memengine::{op}", "CPU")


def test_cpu_kernels_are_multithreaded_like_torch():
    """at::parallel_for is inline OpenMP: a build without -fopenmp would run on one thread."""
    info = _extension.build_info()
    if info is None:
        pytest.skip(f"memengine._C not loaded ({_extension.load_error})")
    if "OpenMP" in torch.__config__.parallel_info():
        assert info["openmp"], "memengine._C was compiled without OpenMP; its CPU kernels run on one thread"


def test_cuda_kernels_registered_when_built_with_cuda():
    """Needs no GPU: the CUDA kernels register with the dispatcher when _C is imported."""
    info = _extension.build_info()
    if os.environ.get("MEMENGINE_TEST_REQUIRE_CUDA_BUILD") == "1":
        assert info is not None and info["cuda"], "CI requires the CUDA kernels to be compiled"
    if info is None or not info["cuda"]:
        pytest.skip("this build of memengine._C has no CUDA kernels")
    for op in me.ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"memengine::{op}", "CUDA"), op
    assert info["cuda_architectures"] not in ("", "unknown")


def test_auto_prefers_compiled_kernels(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    expected = "cpp" if _extension.C is not None else "torch"
    assert _backend.select("accumulate_", "cpu") == expected


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(_extension, "C", None)
    monkeypatch.setattr(_extension, "load_error", "ImportError: simulated")
    monkeypatch.setenv(_backend.ENV_VAR, "cpp")
    with pytest.raises(_backend.BackendUnavailableError, match="MEMENGINE_BACKEND=cpp cannot run .*simulated"):
        me.ops.accumulate_(torch.zeros(3), torch.ones(3))
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    dst = torch.zeros(3)
    me.ops.accumulate_(dst, torch.ones(3))  # falls back to the reference kernel
    assert torch.equal(dst, torch.ones(3))


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setattr(_extension, "C", None)
    monkeypatch.setattr(_extension, "load_error", "ImportError: simulated")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.select("accumulate_", "cpu") == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="triton"):
        me.ops.accumulate_(torch.zeros(3), torch.ones(3))


@pytest.mark.skipif(CUDA, reason="checks the message given when no CUDA kernels can run")
def test_cuda_request_without_gpu_says_why(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="cuda"):
        _backend.select("accumulate_", "cuda")


def test_unknown_backend_value(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="MEMENGINE_BACKEND='fastest' is not one of auto, cpp, triton, torch"):
        me.ops.accumulate_(torch.zeros(3), torch.ones(3))


def run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def test_import_without_extension_warns_once_and_works():
    code = """
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "memengine._C":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import memengine, torch
    import memengine.ops
dst = torch.zeros(4)
memengine.ops.accumulate_(dst, torch.ones(4, dtype=torch.bfloat16), alpha=2.0)
assert dst.tolist() == [2.0] * 4
messages = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
assert len(messages) == 1, messages
assert "simulated" in messages[0]
print("ok")
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_info_command_json():
    result = subprocess.run(
        [sys.executable, "-m", "memengine", "info", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    for key in ("memengine", "torch", "triton", "cuda", "extension", "backends", "cpu"):
        assert key in info, key
    assert info["torch"]["version"] == torch.__version__
    assert info["extension"]["loaded"] == (_extension.C is not None)
    assert set(info["backends"]) == set(me.ops.OPS)
    assert set(info["cpu"]["features"]) >= {"avx512f", "avx512_bf16", "amx_bf16", "avx2"}


def test_info_command_text():
    result = subprocess.run(
        [sys.executable, "-m", "memengine", "info"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "accumulate_" in result.stdout and "torch" in result.stdout


def test_select_is_marked_constant_for_torch_compile_as_the_public_decorator_marks_it():
    """backend.select sets the attribute torch.compiler.assume_constant_result sets, without importing
    torch._dynamo at `import memengine` (issue 19: 1 s of import time); if torch changes the decorator, this fails."""
    import torch

    from memengine.ops import backend

    def probe():
        return None

    marked = torch.compiler.assume_constant_result(probe)
    attributes = {name for name in vars(marked) if name.startswith("_dynamo")}
    assert attributes == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert backend.select._dynamo_marked_constant is True


def test_import_memengine_does_not_import_torch_dynamo():
    import subprocess
    import sys

    code = "import sys, memengine; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "import memengine imported torch._dynamo (about 1 s)"
