"""The ceiling for any bf16 GEMM on this CPU: the AVX512-BF16 dot-product rate of all threads.

Compiles a small C program (gcc, OpenMP) whose threads each run 24 independent chains of
vdpbf16ps on registers (no memory traffic), and prints GFLOP/s per thread and in total
(one 512-bit vdpbf16ps = 32 multiplies + 32 adds = 64 FLOP). wgrad_accumulate_'s benchmark
compares its TFLOP/s, and PyTorch's, with this number.

  python benchmarks/bench_bf16_peak.py [--threads N]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch

PROGRAM = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
int main(void) {
  const long iterations = 100000000;
  double total = 0;
#pragma omp parallel reduction(+ : total)
  {
    __m512 acc[24];
    for (int i = 0; i < 24; i++) acc[i] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
    double start = omp_get_wtime();
    for (long it = 0; it < iterations; it++) {
#pragma GCC unroll 24
      for (int i = 0; i < 24; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      __asm__ volatile("" : "+v"(a));  /* keeps the loop from being folded */
    }
    double seconds = omp_get_wtime() - start;
    float sink = 0;
    for (int i = 0; i < 24; i++) sink += _mm512_reduce_add_ps(acc[i]);
    double gflops = iterations * 24.0 * 64 / seconds / 1e9;
    printf("thread %d: %.1f GFLOP/s (checksum %g)\n", omp_get_thread_num(), gflops, sink);
    total += gflops;
  }
  printf("total: %.1f GFLOP/s\n", total);
  return 0;
}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: torch's thread count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak")
        with open(source, "w") as f:
            f.write(PROGRAM)
        build = subprocess.run(
            ["gcc", "-O2", "-mavx512f", "-mavx512bf16", "-fopenmp", source, "-o", binary],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            sys.exit(f"cannot build the AVX512-BF16 probe (gcc >= 10 needed):\n{build.stderr}")
        if "avx512_bf16" not in open("/proc/cpuinfo").read():
            sys.exit("this CPU has no AVX512-BF16: nothing to measure")
        print(f"AVX512-BF16 dot-product peak, {args.threads} threads")
        run = subprocess.run([binary], env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), text=True)
        sys.exit(run.returncode)


if __name__ == "__main__":
    main()
