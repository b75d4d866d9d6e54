"""Build of memengine and its compiled extension memengine._C.

The distribution is named torch-memengine (`import memengine` is unchanged): the PyPI project
named "memengine" is someone else's, so no message here tells anyone to install that name.

The extension is compiled against the PyTorch already installed in the environment (see the
README, "Installing"): always the C++ CPU kernels, plus the CUDA kernels when a CUDA toolkit
is found and torch is a CUDA build. Whether this machine has a GPU does not matter.

Knobs (environment variables):
  MEMENGINE_SKIP_CUDA_BUILD=1   CPU-only build even when CUDA is available
  MEMENGINE_REQUIRE_CUDA=1      fail instead of falling back to a CPU-only build (CI uses it)
  TORCH_CUDA_ARCH_LIST          CUDA architectures, default "8.0;9.0+PTX"
  MAX_JOBS                      parallel compile jobs, default from cores and free memory
  DEBUG=1                       -O0 -g host code, -lineinfo device code, MEMENGINE_DEBUG defined
  CUDA_HOME                     CUDA toolkit to use (otherwise searched for, see find_cuda_home)
"""

import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
from build_tools.cuda_toolkit import find_cuda_home, pip_cuda_dirs  # noqa: E402

CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# Memory one compile job may need at its peak: nvcc compiling a translation unit that includes
# ATen for two architectures (measured 1.9 GiB peak resident memory).
GIB_PER_JOB = 2.0


def log(message):
    print(f"memengine setup: {message}", flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def import_installed_torch():
    """Imports the user's torch, also from inside pip's isolated build environment.

    pip's build isolation hides the environment's site-packages, so `import torch` fails there
    even though torch is installed ("No module named torch"). Putting torch into the build
    requirements would instead compile against a second, possibly different torch and could
    replace the user's. So when torch is not importable we look in the interpreter's own
    site-packages (appended last, so the isolated build tools still win).
    """
    try:
        import torch

        return torch
    except ImportError:
        pass
    for key in ("platlib", "purelib"):
        path = sysconfig.get_paths()[key]
        if os.path.isdir(os.path.join(path, "torch")) and path not in sys.path:
            sys.path.append(path)
            log(f"build isolation hid torch; using the torch installed in {path}")
    try:
        import torch

        return torch
    except ImportError:
        # Never name the package in an install command: "memengine" on PyPI is an unrelated project.
        sys.exit(
            "memengine setup: PyTorch is not installed. memengine compiles against the torch in your "
            "environment: install it first (pip install torch), then install memengine from its checkout "
            "(`pip install --no-build-isolation .` in the directory holding setup.py) or from a torch-memengine "
            "wheel built there."
        )


def check_cxx_compiler():
    compiler = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(compiler) is None:
        sys.exit(
            f"memengine setup: no C++ compiler found (looked for '{compiler}'). memengine compiles C++ kernels: "
            "install one (Debian/Ubuntu: `apt-get install g++`; Fedora: `dnf install gcc-c++`; "
            "conda: `conda install -c conda-forge cxx-compiler`) or point CXX at it."
        )


def cuda_plan(torch):
    """Returns (cuda_home or None, reason). Decided from the toolkit and torch, never from a GPU."""
    if env_flag("MEMENGINE_SKIP_CUDA_BUILD"):
        return None, "MEMENGINE_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    cuda_home = find_cuda_home(log)
    if cuda_home is None:
        return None, "no CUDA toolkit (nvcc and libcudart) found; set CUDA_HOME to build the CUDA kernels"
    return cuda_home, f"CUDA toolkit at {cuda_home}, torch built for CUDA {torch.version.cuda}"


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            meminfo = {line.split(":")[0]: int(line.split()[1]) for line in f}
        free_gib = meminfo["MemAvailable"] / 2**20
        by_memory = max(1, int(free_gib / GIB_PER_JOB))
    except (OSError, KeyError, ValueError):
        free_gib, by_memory = float("nan"), cores
    return max(1, min(cores, by_memory)), cores, free_gib


def read_sources(cuda):
    with open(os.path.join(CSRC, "sources.txt")) as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return [os.path.join("csrc", name) for name in names if cuda or not name.endswith(".cu")]


def extension_modules(torch):
    check_cxx_compiler()
    cuda_home, reason = cuda_plan(torch)
    if cuda_home is None:
        if env_flag("MEMENGINE_REQUIRE_CUDA"):
            sys.exit(f"memengine setup: MEMENGINE_REQUIRE_CUDA is set but the CUDA kernels cannot be built: {reason}")
        log(f"warning: building the CPU kernels only ({reason})")
    else:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        log(f"building CPU and CUDA kernels ({reason}); architectures {os.environ['TORCH_CUDA_ARCH_LIST']}")
    if "MAX_JOBS" not in os.environ:
        jobs, cores, free_gib = default_max_jobs()
        os.environ["MAX_JOBS"] = str(jobs)
        log(f"MAX_JOBS={jobs} ({cores} cores, {free_gib:.1f} GiB free, {GIB_PER_JOB} GiB per job)")
    else:
        log(f"MAX_JOBS={os.environ['MAX_JOBS']} (from the environment)")

    from torch.utils import cpp_extension

    debug = env_flag("DEBUG")
    # -Wno-maybe-uninitialized: GCC 12 false positives inside its own avx512fintrin.h (_mm512_undefined_*).
    cxx_flags = ["-Wall", "-Wno-psabi", "-Wno-maybe-uninitialized"] + (["-O0", "-g"] if debug else ["-O3"])
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp it silently runs on one
        # thread (measured: 40 vs 51 GB/s for accumulate_ on 64 Mi bf16 elements, 2 cores).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    macros = [("MEMENGINE_DEBUG", None)] if debug else []
    include_dirs = [os.path.join(CSRC, "include"), CSRC]
    kwargs = dict(name="memengine._C", sources=read_sources(cuda_home is not None), include_dirs=include_dirs)
    if cuda_home is None:
        return [
            cpp_extension.CppExtension(
                **kwargs, define_macros=macros, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
            )
        ]
    macros.append(("MEMENGINE_WITH_CUDA", None))
    nvcc_flags = [] + (["-O0", "-lineinfo"] if debug else ["-O3"])
    kwargs["include_dirs"] += pip_cuda_dirs(os.path.dirname(torch.__file__), "include")
    return [
        cpp_extension.CUDAExtension(
            **kwargs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


def torch_requirement(torch):
    """The extension is ABI-bound to the torch it was compiled against: same minor release."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


torch = import_installed_torch()
ext_modules = extension_modules(torch)

setup(
    # The import name stays `memengine`; the distribution needs a name of its own because
    # "memengine" on PyPI is an unrelated project (README, "Installing").
    name="torch-memengine",
    version="0.1.0",
    description="Memory-efficient training for PyTorch: fused fp32 gradient accumulation and recompute planning",
    packages=find_packages(include=["memengine", "memengine.*"]),
    python_requires=">=3.10",
    install_requires=[torch_requirement(torch)],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "numpy", "expecttest"],
        "demo": ["matplotlib", "tqdm"],  # python -m memengine demo: plots and a progress bar
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
