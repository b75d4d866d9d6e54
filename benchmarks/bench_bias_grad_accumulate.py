"""Benchmark of bias_grad_accumulate_: main_grad(fp32 [out]) += grad_output([tokens, out]).sum(0).

Providers (same inputs, same math):
  eager            main_grad.add_(g.float().sum(0))     PyTorch eager
  compile          torch.compile of that function
  memengine-cpp    memengine.ops.bias_grad_accumulate_ on the compiled C++/CUDA kernels
  memengine-triton memengine.ops.bias_grad_accumulate_ on the Triton kernel (GPU only)

GB/s counts the bytes of grad_output read once.

  python benchmarks/bench_bias_grad_accumulate.py
  python benchmarks/bench_bias_grad_accumulate.py --tokens 16384 --out 4096 --dtypes bfloat16
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402


def eager_bias_grad(main_grad, grad_output):
    main_grad.add_(grad_output.float().sum(0))


def memengine_bias_grad(main_grad, grad_output):
    me.ops.bias_grad_accumulate_(main_grad, grad_output)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--out", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    _common.add_common_arguments(parser, "bias_grad.csv")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64
    provider_list = _common.providers(
        eager_bias_grad, torch.compile(eager_bias_grad, dynamic=False), memengine_bias_grad
    )
    results = _common.Results(args.csv)
    print(f"bias_grad_accumulate_ on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(_common.Results.header())
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens in args.tokens:
            for out in args.out:
                grad_output = torch.randn(tokens, out, device=device).to(dtype)
                main_grad = torch.zeros(out, device=device)
                _common.run_providers(
                    results,
                    provider_list,
                    "bias_grad_accumulate_",
                    device,
                    (main_grad, grad_output),
                    grad_output.numel() * grad_output.element_size(),
                    args.min_time,
                    kernel="bias_grad",
                    shape=f"{tokens}x{out}",
                    dtype=dtype_name,
                )
    results.write_csv()


if __name__ == "__main__":
    main()
