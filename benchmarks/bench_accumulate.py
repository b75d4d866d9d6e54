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
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402
from memengine.ops import backend as _backend  # noqa: E402

DEFAULT_SIZES = [2**10, 2**16, 2**20, 2**24, 2**26, 2**28]
ALPHA = 0.5


def eager_accumulate(dst, src, alpha):
    dst.add_(src, alpha=alpha)


def memengine_accumulate(dst, src, alpha):
    me.ops.accumulate_(dst, src, alpha=alpha)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    _common.add_common_arguments(parser, "accumulate.csv")
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
        provider_list = _common.providers(
            eager_accumulate, torch.compile(eager_accumulate, dynamic=False), memengine_accumulate
        )
        for n in args.sizes:
            dst = torch.randn(n, device=device)
            src = torch.randn(n, device=device).to(dtype)
            _common.run_providers(
                results,
                provider_list,
                "accumulate_",
                device,
                (dst, src, ALPHA),
                n * (8 + src.element_size()),
                args.min_time,
                kernel="accumulate_",
                shape=str(n),
                dtype=dtype_name,
            )
            del dst, src
    results.write_csv()


if __name__ == "__main__":
    main()
