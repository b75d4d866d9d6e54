"""Benchmark of accumulate_:  dst(fp32) += alpha * src  for bf16, fp16 and fp32 sources.

Providers (same inputs, same math):
  eager            dst.add_(src, alpha=a)                  PyTorch eager
  compile          torch.compile of that function           PyTorch's fused code (the bar to beat on CPU)
  memengine-cpp    memengine.ops.accumulate_ on the compiled C++/CUDA kernels
  memengine-triton memengine.ops.accumulate_ on the Triton kernel (GPU only)

GB/s counts the bytes the op must move: read and write dst (8) plus read src (2 or 4) per element.

  python benchmarks/bench_accumulate.py                       # 1 Ki .. 256 Mi elements
  python benchmarks/bench_accumulate.py --sizes 67108864 --dtypes bfloat16
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
from memengine import _backend  # noqa: E402

DEFAULT_SIZES = [2**10, 2**16, 2**20, 2**24, 2**26, 2**28]
ALPHA = 0.5


def eager_accumulate(dst, src, alpha):
    dst.add_(src, alpha=alpha)


def memengine_accumulate(dst, src, alpha):
    me.ops.accumulate_(dst, src, alpha=alpha)


def providers(device):
    """(name, function or None, MEMENGINE_BACKEND value, reason when unavailable)."""
    out = [("eager", eager_accumulate, None, None), ("compile", None, None, None)]
    for backend in ("cpp", "triton"):
        reason = _backend.unavailable_reason(backend, "accumulate_", device.type)
        if backend == "triton" and device.type != "cuda":
            reason = "GPU only (the CPU interpreter is for tests, not timing)"
        out.append((f"memengine-{backend}", None if reason else memengine_accumulate, backend, reason))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of samples per measurement")
    parser.add_argument("--csv", default=os.path.join(_common.ROOT, "benchmarks", "results", "accumulate.csv"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64  # one compiled kernel per (size, dtype)
    results = _common.Results(args.csv)
    print(
        f"accumulate_ on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"memengine backend setting {_backend.requested_backend()}"
    )
    print(_common.Results.header())
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        compiled = torch.compile(eager_accumulate, dynamic=False)
        for n in args.sizes:
            dst = torch.randn(n, device=device)
            src = torch.randn(n, device=device).to(dtype)
            bytes_moved = n * (8 + src.element_size())
            for name, fn, backend, reason in providers(device):
                fn = compiled if name == "compile" else fn
                base = dict(kernel="accumulate_", provider=name, shape=str(n), dtype=dtype_name, device=str(device))
                if fn is None:
                    results.add(**base, note=f"skipped: {reason}")
                    continue
                call = functools.partial(fn, dst, src, ALPHA)
                with _common.environment(_backend.ENV_VAR, backend):
                    p20, p50, p80 = _common.measure(call, device, min_time_s=args.min_time)
                    peak = _common.peak_extra_bytes(call, device)
                results.add(
                    **base,
                    p50_ms=p50 * 1e3,
                    p20_ms=p20 * 1e3,
                    p80_ms=p80 * 1e3,
                    throughput=bytes_moved / p50 / 1e9,
                    unit="GB/s",
                    peak_bytes=peak,
                )
            del dst, src
    results.write_csv()


if __name__ == "__main__":
    main()
