"""Accuracy and memory of gradient accumulation over many micro-batches: memengine's Engine
against plain PyTorch, on a bf16 GPT-style model (CPU). The methods live in
memengine/studies/grad_accumulation.py (the tests run them on a smaller model).

It prints, per method (the study's docstring describes them), the step gradient's relative error
against an fp64 oracle and the CPU allocator's peak during the step; a bf16 gradient set is 2
bytes per parameter.

  python benchmarks/bench_grad_accumulation.py [--layers 4 --width 256 --micro-batches 64]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
from memengine.studies.grad_accumulation import run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=64)
    parser.add_argument("--rows", type=int, default=2, help="sequences per micro-batch")
    args = parser.parse_args()
    config = dict(vocab=512, width=args.width, layers=args.layers, heads=4, length=64)
    results, gradient_set_bytes = run(config, args.micro_batches, args.rows)
    parameters = gradient_set_bytes // 2
    print(
        f"GPT-style bf16 model: {args.layers} layers, width {args.width}, {parameters / 1e6:.2f} M parameters; "
        f"{args.micro_batches} micro-batches of {args.rows}x{config['length']} tokens; torch {torch.__version__}"
    )
    print(f"{'method':<28} {'rel. error vs fp64':>20} {'peak MiB during step':>22}")
    for method, row in results.items():
        peak = row.get("peak_bytes")
        print(f"{method:<28} {row['relative_error']:>20.3e} {'' if peak is None else f'{peak / 2**20:.1f}':>22}")
    bf16, master, ours = (results[m]["relative_error"] for m in ("pytorch-bf16", "pytorch-fp32-master", "memengine"))
    print(f"memengine error / fp32-master error: {ours / master:.3f}; / bf16 error: {ours / bf16:.3f}")
    for baseline in ("pytorch-fp32-master", "pytorch-fp32-master-zeroed"):
        saved = results[baseline]["peak_bytes"] - results["memengine"]["peak_bytes"]
        print(
            f"peak saved vs {baseline}: {saved / 2**20:.1f} MiB "
            f"(a bf16 gradient set is {gradient_set_bytes / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()
