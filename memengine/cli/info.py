"""What `python -m memengine info` reports: versions, the build, which backend runs each op, and which
collective paths data parallelism takes on each torch.distributed backend."""

import datetime
import json
import os
import platform

import torch

import memengine
from memengine import ops
from memengine.distributed import collectives
from memengine.ops import backend as backend_selection
from memengine.ops import extension

# /proc/cpuinfo flag names of the CPU features the kernels care about.
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_features():
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {name: name in flags for name in CPU_FEATURES}


def triton_status():
    from memengine import triton as triton_backend

    try:
        import triton

        version = triton.__version__
    except ImportError:
        version = None
    return {
        "version": version,
        "interpreter": triton_backend.interpreting(),
        "cpu": triton_backend.unavailable_reason("accumulate_", "cpu") or "available",
        "cuda": triton_backend.unavailable_reason("accumulate_", "cuda") or "available",
    }


def collective_paths():
    """{"setting": MEMENGINE_COLLECTIVES, "gloo": paths or why not, "nccl": ...}: what
    memengine.distributed.collectives.probe finds for reduce-scatter and all-gather ("native" or
    "fallback") on a one-rank group of each backend, made in this process for the probe (an in-memory
    HashStore) and destroyed after it. Nothing is probed while this process already has a default
    process group: a probe is a collective, which the other ranks of that group would not join."""
    report = {"setting": os.environ.get(collectives.ENV_VAR, "auto")}
    for backend in ("gloo", "nccl"):
        report[backend] = _probe_backend(backend)
    return report


def _probe_backend(backend):
    import torch.distributed as dist

    if not dist.is_available():
        return "not probed: this torch is built without torch.distributed"
    if dist.is_initialized():
        return "not probed: this process already has a default process group"
    if backend == "nccl" and not torch.cuda.is_available():
        return "not probed: CUDA is not available"
    if not dist.is_backend_available(backend):
        return f"not probed: this torch has no {backend} backend"
    try:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
        )
    except (RuntimeError, ValueError) as error:
        return f"not probed: a one-rank {backend} group could not be made ({type(error).__name__}: {error})"
    group = dist.group.WORLD
    try:
        return dict(collectives.probe(group))
    except ValueError as error:  # a bad MEMENGINE_COLLECTIVES value
        return f"probe failed: {error}"
    finally:
        collectives.forget(group)
        dist.destroy_process_group()


def collect():
    build = extension.build_info()
    return {
        "memengine": memengine.__version__,
        "python": platform.python_version(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda},
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "triton": triton_status(),
        "extension": {
            "loaded": extension.C is not None,
            "error": extension.load_error,
            "build": build,
            "cpu_isa": extension.C.cpu_isa() if extension.C is not None else None,
            "wgrad_cpu_path": (
                {dtype: extension.C.wgrad_cpu_path(dtype) for dtype in ("bfloat16", "float16")}
                if extension.C is not None
                else None
            ),
        },
        "backend_setting": backend_selection.requested_backend(),
        "backends": backend_selection.report(ops.OPS),
        "cpu": {"machine": platform.machine(), "threads": torch.get_num_threads(), "features": cpu_features()},
        "collectives": collective_paths(),
    }


def render(info):
    ext = info["extension"]
    build = ext["build"] or {}
    lines = [
        f"memengine {info['memengine']}  (python {info['python']})",
        f"torch     {info['torch']['version']}  (CUDA build: {info['torch']['cuda'] or 'no'})",
        f"triton    {info['triton']['version'] or 'not installed'}  "
        f"(TRITON_INTERPRET={int(info['triton']['interpreter'])})",
        f"GPU       {', '.join(info['cuda']['devices']) or 'none'}",
        "",
        "compiled extension memengine._C: " + ("loaded" if ext["loaded"] else f"NOT loaded: {ext['error']}"),
    ]
    if ext["loaded"]:
        archs = build["cuda_architectures"] or "-"
        lines += [
            f"  built against torch {build['torch_version']}, debug={build['debug']}",
            f"  CUDA kernels: {'yes' if build['cuda'] else 'no'}, architectures {archs}, "
            f"CUDA runtime {build['cuda_runtime_version']}",
            f"  CPU kernels: ISA in use {ext['cpu_isa']} (best supported {build['cpu_isa_supported']})",
            f"  wgrad_accumulate_ CPU GEMM: bfloat16 -> {ext['wgrad_cpu_path']['bfloat16']}, "
            f"float16 -> {ext['wgrad_cpu_path']['float16']} (MEMENGINE_WGRAD_CPU)",
        ]
    features = info["cpu"]["features"]
    lines += [
        "",
        f"CPU {info['cpu']['machine']}, {info['cpu']['threads']} threads; "
        + " ".join(f"{name}={'yes' if present else 'no'}" for name, present in features.items()),
        "",
        f"backends (MEMENGINE_BACKEND={info['backend_setting']}):",
    ]
    for op, per_device in info["backends"].items():
        for device, backend in per_device.items():
            lines.append(f"  {op:<20} {device:<5} {backend}")
    paths = info["collectives"]
    lines += ["", f"data-parallel collectives ({collectives.ENV_VAR}={paths['setting']}; probed on a one-rank group):"]
    for backend in ("gloo", "nccl"):
        found = paths[backend]
        if isinstance(found, dict):
            found = ", ".join(f"{name} {path}" for name, path in found.items())
        lines.append(f"  {backend:<5} {found}")
    return "\n".join(lines)


def main(as_json=False):
    info = collect()
    print(json.dumps(info, indent=2) if as_json else render(info))
