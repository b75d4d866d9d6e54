"""Benchmark of grad_stats_: flat *= scale, then (L2 norm, non-finite count), on an fp32 buffer.

Providers (same buffer, same scale):
  eager            flat.mul_(s); stack([vector_norm(flat), (~isfinite(flat)).sum()])   PyTorch eager
  compile          torch.compile of that function
  memengine-cpp    memengine.ops.grad_stats_ on the compiled C++/CUDA kernels (one pass)
  memengine-triton memengine.ops.grad_stats_ on the Triton kernel (GPU only)

The baselines compute the norm in float32 and over all values (a non-finite value makes it
inf/nan); memengine sums in float64 over the finite values, i.e. it does more, not less.
GB/s counts 8 bytes per element (read and write the buffer once).

  python benchmarks/bench_grad_stats.py
  python benchmarks/bench_grad_stats.py --sizes 67108864
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402

DEFAULT_SIZES = [2**20, 2**24, 2**26]


def eager_grad_stats(flat, scale):
    flat.mul_(scale)
    return torch.stack([torch.linalg.vector_norm(flat), (~torch.isfinite(flat)).sum().to(torch.float32)])


def memengine_grad_stats(flat, scale):
    return me.ops.grad_stats_(flat, scale)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    _common.add_common_arguments(parser, "grad_stats.csv")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64
    provider_list = _common.providers(
        eager_grad_stats, torch.compile(eager_grad_stats, dynamic=False), memengine_grad_stats
    )
    results = _common.Results(args.csv)
    print(f"grad_stats_ on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(_common.Results.header())
    for n in args.sizes:
        # The smallest scale above 1: every provider multiplies and writes (memengine skips the
        # write-back only for a scale of exactly 1), and the values stay finite over all repeats.
        flat = torch.randn(n, device=device)
        scale = torch.tensor(1.0 + 2.0**-23, device=device)
        _common.run_providers(
            results,
            provider_list,
            "grad_stats_",
            device,
            (flat, scale),
            8 * n,
            args.min_time,
            kernel="grad_stats_",
            shape=str(n),
            dtype="float32",
        )
        del flat
    results.write_csv()


if __name__ == "__main__":
    main()
