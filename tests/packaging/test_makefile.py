"""`make build` recompiles the extension only when something it is built from changed.

The real Makefile runs on a miniature tree whose venv Python is a stub: the stub's `pip install`
logs the call and writes a fake memengine/_C*.so, so these tests take seconds and compile nothing.
"""

import os
import pathlib
import shutil
import subprocess
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SO = "memengine/_C.stub.so"
BUILD_KNOBS = ("MEMENGINE_SKIP_CUDA_BUILD", "MEMENGINE_REQUIRE_CUDA", "TORCH_CUDA_ARCH_LIST", "DEBUG", "CUDA_HOME")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make, which is not installed")

STUB_PYTHON = textwrap.dedent(
    """\
    #!/bin/sh
    # Stands in for the venv's python: `-m pip install ...` "builds", `-m memengine info` prints.
    if [ "$2" = pip ]; then
        echo "pip $*" >> "$STUB_LOG"
        echo "memengine setup: stub build"
        date +%s%N > "$SO"  # every build writes a new extension, as a real one does
        echo "Successfully installed $STUB_INSTALLED_NAME-0.1.0"
    else
        echo "memengine 0.1.0 (stub)"
    fi
    """
)


@pytest.fixture
def tree(tmp_path):
    """A miniature checkout: the real Makefile, setup.py-like inputs, a venv with a stub python."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("setup.py", "pyproject.toml", "csrc/cpu/accumulate.cpp", "build_tools/cuda_toolkit.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# stub\n")
    (tmp_path / "memengine").mkdir()
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    (tmp_path / "venv" / ".installed").touch()
    # Everything existed well before the first build, as in a checkout.
    for path in tmp_path.rglob("*"):
        os.utime(path, (path.stat().st_mtime - 100, path.stat().st_mtime - 100))
    return tmp_path


def touch_after_the_build(tree, path):
    """Changes `path`'s time stamp to one later than the last build's (the file system's clock may be coarse)."""
    built = (tree / "venv" / ".built").stat().st_mtime_ns
    while path.stat().st_mtime_ns <= built:
        path.touch()


def make(tree, *args, installed_name="torch-memengine", **knobs):
    """Runs `make VENV=venv <args>` in `tree`; returns (exit status, output, pip calls so far)."""
    env = {k: v for k, v in os.environ.items() if k not in BUILD_KNOBS and not k.startswith("MAKE")}
    env.update(knobs, STUB_LOG=str(tree / "pip.log"), SO=str(tree / SO), STUB_INSTALLED_NAME=installed_name)
    result = subprocess.run(
        ["make", "--no-print-directory", "VENV=venv", *args], cwd=tree, env=env, capture_output=True, text=True
    )
    log = tree / "pip.log"
    calls = len(log.read_text().splitlines()) if log.exists() else 0
    return result.returncode, result.stdout + result.stderr, calls


def test_second_build_does_not_recompile(tree):
    status, output, calls = make(tree, "build")
    assert status == 0 and calls == 1, output
    status, output, calls = make(tree, "build")
    assert status == 0, output
    assert calls == 1, f"the second `make build` ran pip again although nothing changed:\n{output}"
    status, output, calls = make(tree, "-n", "build")
    assert status == 0 and "pip install" not in output, f"a dry run would rebuild:\n{output}"
    assert "memengine info" in output  # build still reports what it built against


@pytest.mark.parametrize("changed", ["csrc/cpu/accumulate.cpp", "setup.py", "build_tools/cuda_toolkit.py"])
def test_a_changed_source_recompiles(tree, changed):
    assert make(tree, "build")[2] == 1
    touch_after_the_build(tree, tree / changed)
    status, output, calls = make(tree, "-n", "build")
    assert "pip install" in output, f"a dry run after touching {changed} would not rebuild:\n{output}"
    status, output, calls = make(tree, "build")
    assert status == 0 and calls == 2, output
    assert make(tree, "build")[2] == 2


def test_a_new_source_file_recompiles(tree):
    assert make(tree, "build")[2] == 1
    (tree / "csrc/cpu/new_op.cpp").write_text("// new\n")
    touch_after_the_build(tree, tree / "csrc/cpu/new_op.cpp")
    assert make(tree, "build")[2] == 2


def test_a_changed_build_knob_recompiles(tree):
    assert make(tree, "build")[2] == 1
    assert make(tree, "build", DEBUG="1")[2] == 2
    assert make(tree, "build", DEBUG="1")[2] == 2
    # "0": a value that differs from the default both with a GPU (unset) and without one (make sets 1).
    assert make(tree, "build", MEMENGINE_SKIP_CUDA_BUILD="0", DEBUG="1")[2] == 3


def fake_nvidia_smi(tree, listing):
    """A directory holding an nvidia-smi that prints `listing`, for PATH."""
    folder = tree / "fake-bin"
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nif [ \"$1\" = -L ]; then echo '{listing}'; else echo ' 9.0'; fi\n")
    script.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize(
    "listing, skipped",
    [("", True), ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", False)],
    ids=["no GPU", "a GPU"],
)
def test_without_a_gpu_the_cuda_kernels_are_not_built_unless_asked_for(tree, listing, skipped):
    """Compiling the CUDA kernels took minutes (13 on a shared 2-core machine) where none can run (issue 19)."""
    path = fake_nvidia_smi(tree, listing)
    status, output, _ = make(tree, "build", PATH=path)
    assert status == 0, output
    stamp = (tree / "venv" / ".built").read_text()
    assert ("MEMENGINE_SKIP_CUDA_BUILD=1" in stamp) == skipped, stamp
    assert ("CPU kernels only" in output) == skipped, output
    # With a GPU, its architecture only (nvidia-smi's compute capability), unless TORCH_CUDA_ARCH_LIST is given.
    assert ("TORCH_CUDA_ARCH_LIST=9.0 " in stamp) == (not skipped), stamp
    if skipped:  # asked for: CI's CUDA stage
        make(tree, "build", PATH=path, MEMENGINE_REQUIRE_CUDA="1")
        assert "MEMENGINE_SKIP_CUDA_BUILD= " in (tree / "venv" / ".built").read_text()
    else:
        make(tree, "build", PATH=path, TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX")
        assert "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX " in (tree / "venv" / ".built").read_text()


def test_an_extension_from_another_venv_or_a_missing_one_recompiles(tree):
    assert make(tree, "build")[2] == 1
    # A build into another venv (VENV=.venv-cpu) writes its own extension to the same place in the tree.
    (tree / SO).write_text("built against another torch\n")
    assert make(tree, "build")[2] == 2
    (tree / SO).unlink()
    assert make(tree, "build")[2] == 3
    assert make(tree, "build")[2] == 3


def test_build_fails_when_pip_did_not_install_torch_memengine(tree):
    # The success check looks for the new distribution name; pip reporting the old one is a failure.
    status, output, _ = make(tree, "build", installed_name="memengine")
    assert status != 0, output
    assert make(tree, "build")[0] == 0
