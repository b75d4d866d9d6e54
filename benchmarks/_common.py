"""Shared benchmark plumbing: robust timing, the CSV format of DESIGN.md, a printed table."""

import contextlib
import csv
import functools
import os
import statistics
import subprocess
import time

import torch

from memengine.segments import allocator_peak

CSV_FIELDS = [
    "kernel",
    "provider",
    "shape",
    "dtype",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "throughput",
    "unit",
    "peak_bytes",
    "max_error",
    "torch",
    "git_sha",
    "device",
    "threads",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_common_arguments(parser, csv_name):
    """--device, --min-time and --csv, as every benchmark takes them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of samples per measurement")
    parser.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", csv_name))


def git_sha():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def environment(name, value):
    """Sets (or, with None, leaves alone) an environment variable for the duration."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name)
        else:
            os.environ[name] = previous


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns, device, min_time_s=0.5, min_repeats=7, max_repeats=200, min_sample_s=1e-3):
    """The one timing helper of the benchmarks: percentiles (p20, p50, p80) of the time of one call,
    in seconds, of a callable, or of each callable in a list (then a list of triples).

    Each sample times a batch of calls long enough (min_sample_s) for the clock to resolve.
    Several callables are timed round-robin (each round samples every one of them once), so the
    drifts of a shared machine hit them alike. Samples are taken until min_repeats rounds are done
    and min_time_s per callable has passed, or max_repeats rounds.
    """
    single = callable(fns)
    fns = [fns] if single else list(fns)
    batches = []
    for fn in fns:
        fn()  # warm-up (also triggers compilation)
        fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        once = max(time.perf_counter() - start, 1e-7)
        batches.append(max(1, int(min_sample_s / once)))
    samples = [[] for _ in fns]
    started = time.perf_counter()
    while len(samples[0]) < max_repeats and (
        len(samples[0]) < min_repeats or time.perf_counter() - started < min_time_s * len(fns)
    ):
        for fn, batch, times in zip(fns, batches, samples, strict=True):
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            synchronize(device)
            times.append((time.perf_counter() - t0) / batch)
    results = []
    for times in samples:
        q = statistics.quantiles(times, n=10, method="inclusive")
        results.append((q[1], statistics.median(times), q[7]))
    return results[0] if single else results


def peak_extra_bytes(fn, device):
    """The one peak-memory helper of the benchmarks: memengine.segments.allocator_peak."""
    return allocator_peak.peak_extra_bytes(fn, device)


class Results:
    def __init__(self, csv_path):
        self.csv_path = csv_path
        self.rows = []
        self.sha = git_sha()

    def add(self, **row):
        row.update(torch=torch.__version__, git_sha=self.sha, threads=torch.get_num_threads())
        self.rows.append(row)
        print(self.format_row(row), flush=True)

    @staticmethod
    def header():
        return (
            f"{'kernel':<12} {'provider':<22} {'shape':>15} {'dtype':<9} {'p50 ms':>10} {'p20 ms':>10} "
            f"{'p80 ms':>10} {'throughput':>12} {'extra MiB':>10}"
        )

    @staticmethod
    def format_row(row):
        if row.get("p50_ms") is None:
            return f"{row['kernel']:<12} {row['provider']:<22} {row['shape']:>15} {row['dtype']:<9} {row['note']}"
        return (
            f"{row['kernel']:<12} {row['provider']:<22} {row['shape']:>15} {row['dtype']:<9} "
            f"{row['p50_ms']:>10.4f} {row['p20_ms']:>10.4f} {row['p80_ms']:>10.4f} "
            f"{row['throughput']:>8.3g} {row['unit']:<5}"
            + (f" {row['peak_bytes'] / 2**20:>8.1f}" if row.get("peak_bytes") is not None else "")
            + (f"  max err {row['max_error']:.3g}" if row.get("max_error") is not None else "")
        )

    def write_csv(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.csv_path)), exist_ok=True)
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in self.rows:
                if row.get("p50_ms") is not None:
                    writer.writerow(row)
        print(f"\nappended {sum(r.get('p50_ms') is not None for r in self.rows)} rows to {self.csv_path}")


def providers(eager_fn, compiled_fn, memengine_fn):
    """The standard providers: (name, function, MEMENGINE_BACKEND value or None)."""
    return [
        ("eager", eager_fn, None),
        ("compile", compiled_fn, None),
        ("memengine-cpp", memengine_fn, "cpp"),
        ("memengine-triton", memengine_fn, "triton"),
    ]


def run_providers(results, provider_list, op, device, args, bytes_moved, min_time_s, **row):
    """Times each provider on the same arguments and adds one row per provider (or a skip note)."""
    from memengine.ops import backend as _backend

    for name, fn, backend in provider_list:
        base = dict(row, provider=name, device=str(device))
        reason = None if backend is None else _backend.unavailable_reason(backend, op, device.type)
        if backend == "triton" and device.type != "cuda":
            reason = "GPU only (the CPU interpreter is for tests, not timing)"
        if reason:
            results.add(**base, note=f"skipped: {reason}")
            continue
        with environment(_backend.ENV_VAR, backend):
            results.add(**base, **timed(functools.partial(fn, *args), device, min_time_s, bytes_moved / 1e9, "GB/s"))


def timed(call, device, min_time_s, work, unit):
    """The timing columns of a row: percentiles of one call, `work` per second in `unit` (work is
    counted in that unit, e.g. GB or TFLOP), and the extra memory of one call."""
    p20, p50, p80 = measure(call, device, min_time_s=min_time_s)
    return dict(
        p50_ms=p50 * 1e3,
        p20_ms=p20 * 1e3,
        p80_ms=p80 * 1e3,
        throughput=work / p50,
        unit=unit,
        peak_bytes=peak_extra_bytes(call, device),
    )
