"""Finds the CUDA toolkit and the pip-installed CUDA libraries, for setup.py and CMakeLists.txt.

Run as a script it prints a CMake list `CUDA_HOME;NVRTC_LIBRARY;INCLUDE_DIR...` (empty fields
when not found; the include directories are those of the nvidia-* wheels).
"""

import glob
import os
import shutil
import subprocess
import sys


def is_cuda_home(path):
    """A CUDA toolkit root must have nvcc and the runtime library, not just an nvcc wrapper."""
    if not path:
        return False
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    runtime = glob.glob(os.path.join(path, "lib64", "libcudart.so*")) + glob.glob(
        os.path.join(path, "targets", "*", "lib", "libcudart.so*")
    )
    return has_nvcc and bool(runtime)


def find_cuda_home(log=print):
    """CUDA_HOME/CUDA_PATH if set, else the toolkit around nvcc, else the usual install paths.

    /usr/local/bin/nvcc may be a wrapper script; torch's own guess then yields /usr/local, which
    has no libcudart, and the link fails. So every candidate must pass is_cuda_home().
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(name)
        if path:
            if is_cuda_home(path):
                return path
            log(f"warning: {name}={path} has no bin/nvcc and libcudart; searching elsewhere")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script: nvcc's dry run names the directory it really lives in
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
            for line in (out.stdout + out.stderr).splitlines():
                if "TOP=" in line:
                    candidates.append(line.split("TOP=", 1)[1].strip().strip('"'))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for path in candidates:
        if is_cuda_home(path):
            return os.path.realpath(path)
    return None


def pip_cuda_dirs(torch_dir, kind):
    """`include` or `lib` directories of the nvidia-* wheels beside torch. The system toolkit may
    lack headers such as cublas_v2.h and cusparse.h that ATen/cuda includes."""
    site = os.path.dirname(torch_dir)
    return sorted(path for path in glob.glob(os.path.join(site, "nvidia", "cu*", kind)) if os.path.isdir(path))


def nvrtc_library(torch_dir, cuda_home):
    for directory in pip_cuda_dirs(torch_dir, "lib") + ([os.path.join(cuda_home, "lib64")] if cuda_home else []):
        found = sorted(glob.glob(os.path.join(directory, "libnvrtc.so*")))
        if found:
            return found[0]
    return ""


if __name__ == "__main__":
    import torch

    cuda_home = find_cuda_home(log=lambda message: print(message, file=sys.stderr))
    torch_dir = os.path.dirname(torch.__file__)
    print(";".join([cuda_home or "", nvrtc_library(torch_dir, cuda_home)] + pip_cuda_dirs(torch_dir, "include")))
