"""Benchmark of wgrad_accumulate_: main_grad(fp32 [out, in]) += grad_output([tokens, out])^T @ input([tokens, in]).

Providers (same inputs, same math):
  lossy                main_grad.add_(g.t() @ x)                   PyTorch's bf16/fp16 GEMM, result rounded
                                                                   to the input dtype, then added
  exact                main_grad.addmm_(g.t().float(), x.float())  PyTorch on fp32 copies of both inputs
  compile-lossy        torch.compile of lossy
  compile-exact        torch.compile of exact
  memengine-cpp        memengine.ops.wgrad_accumulate_ (compiled kernels; on CPU the automatic GEMM choice)
  memengine-<path>     the same, CPU GEMM pinned: mkl, avx512_bf16, chunked (the no-MKL fallback)
  memengine-triton     the Triton kernel (GPU only)

TFLOP/s counts 2 * tokens * out * in. "max err" is the largest absolute difference from an fp64
oracle (computed once per case from the same inputs). "extra MiB" is the peak of memory allocated
during one call beyond what was live before it (CUDA allocator; on CPU the profiler's record of
PyTorch's CPU allocator, which does not see MKL's or oneDNN's private buffers).

  python benchmarks/bench_wgrad_accumulate.py
  python benchmarks/bench_wgrad_accumulate.py --tokens 4096 --weights 4096x1024 --dtypes bfloat16
"""

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402
from memengine.ops import backend as _backend  # noqa: E402
from memengine.ops import extension as _extension  # noqa: E402

CPU_PATHS = ("mkl", "avx512_bf16", "chunked")


def lossy(main_grad, g, x):
    main_grad.add_(g.t() @ x)


def exact(main_grad, g, x):
    main_grad.addmm_(g.t().float(), x.float())


def memengine_wgrad(main_grad, g, x):
    me.ops.wgrad_accumulate_(main_grad, g, x)


def provider_list(device):
    """(name, function, MEMENGINE_BACKEND, CPU GEMM path or None, why it cannot run or None)."""
    compiled_lossy = torch.compile(lossy, dynamic=False)
    compiled_exact = torch.compile(exact, dynamic=False)
    rows = [
        ("lossy", lossy, None, None, None),
        ("exact", exact, None, None, None),
        ("compile-lossy", compiled_lossy, None, None, None),
        ("compile-exact", compiled_exact, None, None, None),
        ("memengine-cpp", memengine_wgrad, "cpp", "auto", None),
    ]
    if device.type == "cpu":
        for path in CPU_PATHS:
            reason = None
            try:
                _extension.C.set_wgrad_cpu_path(path)
            except (AttributeError, ValueError) as error:
                reason = str(error)
            rows.append((f"memengine-{path}", memengine_wgrad, "cpp", path, reason))
        if _extension.C is not None:
            _extension.C.set_wgrad_cpu_path("auto")
        rows.append(
            ("memengine-triton", memengine_wgrad, "triton", None, "GPU only (the CPU interpreter is for tests)")
        )
    else:
        rows.append(("memengine-triton", memengine_wgrad, "triton", None, None))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument(
        "--weights", nargs="+", default=["1024x1024", "4096x1024", "1024x4096", "4096x4096"], help="out x in"
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    _common.add_common_arguments(parser, "wgrad.csv")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64
    providers = provider_list(device)
    results = _common.Results(args.csv)
    paths = f", CPU GEMM auto -> {_extension.C.wgrad_cpu_path('bfloat16')}" if _extension.C is not None else ""
    print(f"wgrad_accumulate_ on {device} ({torch.get_num_threads()} threads{paths}), torch {torch.__version__}")
    print(_common.Results.header())
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens in args.tokens:
            for weight in args.weights:
                out_features, in_features = (int(v) for v in weight.split("x"))
                g = torch.randn(tokens, out_features, device=device).to(dtype)
                x = torch.randn(tokens, in_features, device=device).to(dtype)
                oracle = (g.double().t() @ x.double()).cpu()
                flops = 2 * tokens * out_features * in_features
                for name, fn, backend, path, reason in providers:
                    row = dict(
                        kernel="wgrad", provider=name, shape=f"{tokens}x{weight}", dtype=dtype_name, device=str(device)
                    )
                    if reason is None and backend is not None:
                        reason = _backend.unavailable_reason(backend, "wgrad_accumulate_", device.type)
                    if reason:
                        results.add(**row, note=f"skipped: {reason}")
                        continue
                    if path is not None and device.type == "cpu":
                        _extension.C.set_wgrad_cpu_path(path)
                    main_grad = torch.zeros(out_features, in_features, device=device)
                    with _common.environment(_backend.ENV_VAR, backend):
                        fn(main_grad, g, x)  # one call from zero: its error against the oracle
                        max_error = (main_grad.cpu().double() - oracle).abs().max().item()
                        call = functools.partial(fn, main_grad, g, x)
                        results.add(
                            **row,
                            **_common.timed(call, device, args.min_time, flops / 1e12, "TFLOP/s"),
                            max_error=max_error,
                        )
                    del main_grad
    if device.type == "cpu" and _extension.C is not None:
        _extension.C.set_wgrad_cpu_path("auto")
    results.write_csv()


if __name__ == "__main__":
    main()
