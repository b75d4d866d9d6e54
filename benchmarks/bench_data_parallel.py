"""Data parallelism: bytes communicated and per-rank memory per step, memengine against torch DDP.

For each world size (default 1, 2, 4; spawned ranks, OMP_NUM_THREADS=1, gloo on CPU, NCCL on GPUs
with one GPU per rank and the world capped at the GPU count) the GPT fixture (memengine.models.GPT)
trains a few AdamW steps of 4 micro-batches per rank, the same weights and tokens in every row:
  memengine ZeRO-1      Engine(bf16 model, process_group=WORLD): reduce-scatter of the fp32 gradient
                        buckets, fp32 masters and AdamW state for this rank's shard, all-gather of the
                        updated bf16 parameters
  memengine unsharded   the same with shard=False: all-reduce of the fp32 buckets, whole masters
  torch DDP + no_sync   an fp32 copy of the model (its parameters are the fp32 masters) in
                        DistributedDataParallel(gradient_as_bucket_view=True), no_sync() on micro-batches
                        1..M-1, AdamW; the loss is scaled by world / global token count (one scalar
                        all-reduce per step) so that the step's gradient is the same global token mean
  torch DDP + no_sync + torch.compile   the same, the DDP module compiled (only with --compile)

Measured per step, on every rank:
- bytes communicated: every torch.distributed collective this process calls is wrapped and the
  bytes of the tensors it is given are summed (all_reduce: the tensor; reduce-scatter: the input;
  all-gather: the output; broadcast: the tensor), with the number of calls. DDP's reducer calls its
  collectives from C++, where no Python wrapper sees them, so the DDP rows register a comm hook
  (torch's own default allreduce_hook) whose per-bucket torch.distributed.all_reduce the same
  wrapper counts. Counting starts after the build, so the one-time broadcast of the parameters (and
  memengine's probe of the collective paths) is not in it. Gradient collectives are those on the
  gradient storage (memengine's GradBuffer, DDP's buckets); everything else reduced is "scalars".
- per-rank peak memory of a whole steady-state step (the third): on CPU the peak of the bytes
  allocated through PyTorch's CPU allocator (profiler memory events,
  memengine.segments.allocator_peak.cpu_allocation_timeline) counted from before the model was
  built, so parameters, gradients, masters and optimizer state are in it; on CUDA
  torch.cuda.max_memory_allocated over the step.
- masters + optimizer state bytes per rank: the storages of the fp32 masters (DDP: the fp32
  parameters) and of the AdamW state, deduplicated.
- step time: median of the steps after the profiled ones (the machine may be shared: noisy).

  python benchmarks/bench_data_parallel.py [--worlds 1 2 4] [--quick] [--compile] [--bucket-mib 4]
"""

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402
from memengine.distributed import collectives  # noqa: E402
from memengine.models import GPT  # noqa: E402
from memengine.segments.allocator_peak import cpu_allocation_timeline  # noqa: E402

ZERO1, UNSHARDED, DDP, DDP_COMPILE = (
    "memengine ZeRO-1",
    "memengine unsharded",
    "torch DDP + no_sync",
    "torch DDP + no_sync + torch.compile",
)
# Profiled: the build, a warm-up step (memengine learns its contribution counts, DDP builds its buckets),
# a second (DDP rebuilds its buckets in the order gradients became ready), then the measured step.
PROFILED_STEPS = 3
MIB = 2**20
COMPILE_SKIPPED = (
    "not run (--compile adds it): compiling the GPT took 31 s in one process on the 2-core development machine, "
    "times the ranks sharing those cores; compiling changes activations and time, not the bytes communicated "
    "or the masters and optimizer state compared here"
)
CONFIGS = {
    "default": dict(vocab=512, width=256, layers=4, heads=4, length=64, rows=2, micro_batches=4, timed_steps=2),
    "quick": dict(vocab=256, width=64, layers=2, heads=4, length=32, rows=2, micro_batches=4, timed_steps=1),
}


class CollectiveCounter:
    """Wraps torch.distributed's collectives in this process; while `active`, sums the bytes each call
    is given (see the module docstring) by (kind, category). A collective that calls another through
    torch.distributed is counted once, as the outer call."""

    BYTES = {
        "all_reduce": ("all-reduce", lambda tensor, *a, **k: [tensor]),
        "reduce_scatter_single": ("reduce-scatter", lambda output, input, *a, **k: [input]),
        "reduce_scatter_tensor": ("reduce-scatter", lambda output, input, *a, **k: [input]),
        "reduce_scatter": ("reduce-scatter", lambda output, input_list, *a, **k: input_list),
        "all_gather_single": ("all-gather", lambda output, input, *a, **k: [output]),
        "all_gather_into_tensor": ("all-gather", lambda output, input, *a, **k: [output]),
        "all_gather": ("all-gather", lambda tensor_list, tensor, *a, **k: tensor_list),
        "broadcast": ("broadcast", lambda tensor, *a, **k: [tensor]),
    }

    def __init__(self):
        self.active = False
        self.gradient_storages = set()  # data pointers of the storages gradients are reduced in
        self.totals = {}  # (kind, category) -> [calls, bytes]
        self._depth = threading.local()
        for name, (kind, tensors_of) in self.BYTES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrapped(getattr(dist, name), kind, tensors_of))

    def _wrapped(self, function, kind, tensors_of):
        @functools.wraps(function)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "value", 0)
            if self.active and depth == 0:
                tensors = tensors_of(*args, **kwargs)
                self.add(kind, self._category(kind, tensors), sum(t.numel() * t.element_size() for t in tensors))
            self._depth.value = depth + 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth.value = depth

        return counted

    def _category(self, kind, tensors):
        if kind == "all-gather":
            return "parameters"
        if (
            kind in ("all-reduce", "reduce-scatter")
            and tensors[0].untyped_storage().data_ptr() in self.gradient_storages
        ):
            return "gradients"
        return "scalars"

    def add(self, kind, category, nbytes):
        entry = self.totals.setdefault(f"{kind} {category}", [0, 0])
        entry[0] += 1
        entry[1] += nbytes

    def take(self):
        totals, self.totals = self.totals, {}
        return totals


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
    return loss, tokens[:, 1:].numel()


def rank_batch(config, step, rank, world, device):
    """This rank's rows of the step's global batch (the same global batch for every row of the table)."""
    rows = config["rows"] * config["micro_batches"]
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, config["vocab"], (world * rows, config["length"] + 1), generator=generator)
    return tokens[rank * rows : (rank + 1) * rows].to(device)


def build_model(config, dtype, device):
    torch.manual_seed(0)
    model = GPT(config["vocab"], config["width"], config["layers"], config["heads"], config["length"])
    return model.to(device=device, dtype=dtype)


def storage_bytes(tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values())


def optimizer_state_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class MemengineRow:
    def __init__(self, config, device, counter, shard):
        self.model = build_model(config, torch.bfloat16, device)
        self.engine = me.Engine(
            self.model,
            functools.partial(torch.optim.AdamW, lr=1e-3),
            micro_batch_size=config["rows"],
            process_group=dist.group.WORLD,
            shard=shard,
            bucket_bytes=config["bucket_bytes"],
        )
        counter.gradient_storages = {self.engine.buffer.data.untyped_storage().data_ptr()}
        self.buckets = len(self.engine.buffer.buckets)
        self.paths = collectives.probe(dist.group.WORLD)

    def step(self, tokens):
        return float(self.engine.step(tokens, loss_fn)["loss"])

    def masters_and_optimizer_state(self):
        optimizer = self.engine.optimizer
        return storage_bytes([optimizer.master_data, *optimizer_state_tensors(optimizer)])


class DDPRow:
    def __init__(self, config, device, counter, compiled):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        self.model = build_model(config, torch.float32, device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=config["bucket_bytes"] / MIB,
            gradient_as_bucket_view=True,  # DDP's lighter setting: .grad are views of the buckets
        )

        def counted_allreduce_hook(state, bucket):
            counter.gradient_storages.add(bucket.buffer().untyped_storage().data_ptr())
            return default_hooks.allreduce_hook(state, bucket)  # divides by world, dist.all_reduce (counted)

        self.ddp.register_comm_hook(None, counted_allreduce_hook)
        self.forward = torch.compile(self.ddp) if compiled else self.ddp
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.micro_batches = config["micro_batches"]
        self.world = dist.get_world_size()
        self.buckets = None  # DDP rebuilds its buckets after the first step; counted calls show them

    def step(self, tokens):
        micro_batches = tokens.split(tokens.shape[0] // self.micro_batches)
        local_tokens = sum(micro_batch[:, 1:].numel() for micro_batch in micro_batches)
        global_tokens = torch.tensor([float(local_tokens)], device=tokens.device)
        dist.all_reduce(global_tokens)  # the global token mean, as memengine's Engine computes it
        scale = self.world / global_tokens  # DDP averages over ranks; this makes it a sum over tokens
        loss_total = torch.zeros((), device=tokens.device)
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss_sum, _ = loss_fn(self.forward, micro_batch)
                (loss_sum * scale).backward()
            loss_total += loss_sum.detach()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss_total / global_tokens)  # this rank's share of the global mean loss

    def masters_and_optimizer_state(self):
        return storage_bytes([*self.model.parameters(), *optimizer_state_tensors(self.optimizer)])


def build_row(name, config, device, counter):
    if name in (ZERO1, UNSHARDED):
        return MemengineRow(config, device, counter, shard=name == ZERO1)
    return DDPRow(config, device, counter, compiled=name == DDP_COMPILE)


def measure_row(name, config, rank, world, device, counter):
    """One row on this rank: bytes of each counted step, the profiled step's peak, step times."""
    holder = {}
    steps = {"bytes": [], "loss": None}

    def step(index):
        counted = index >= PROFILED_STEPS - 1  # steady-state steps only (see PROFILED_STEPS)
        counter.active = counted
        loss = holder["row"].step(rank_batch(config, index, rank, world, device))
        counter.active = False
        if counted:
            steps["bytes"].append(counter.take())
        steps["loss"] = loss

    def profiled():
        holder["row"] = build_row(name, config, device, counter)
        for index in range(PROFILED_STEPS - 1):
            step(index)
        with torch.profiler.record_function("measured step"):
            step(PROFILED_STEPS - 1)

    counter.take()
    if device.type == "cuda":
        holder["row"] = build_row(name, config, device, counter)
        for index in range(PROFILED_STEPS - 1):
            step(index)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(PROFILED_STEPS - 1)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        timeline, events = cpu_allocation_timeline(profiled)
        (span,) = [e for e in events if e.name() == "measured step"]
        peak = max(live for when, live in timeline if span.start_ns() <= when <= span.end_ns())
    times = []
    for index in range(PROFILED_STEPS, PROFILED_STEPS + config["timed_steps"]):
        dist.barrier()  # every rank starts the step together: the time is the step's, not a straggler's
        start = time.perf_counter()
        step(index)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    row = holder["row"]
    result = {
        "bytes": steps["bytes"],
        "peak_bytes": peak,
        "masters_and_optimizer_bytes": row.masters_and_optimizer_state(),
        "step_s": statistics.median(times),
        "loss": steps["loss"],
        "parameters": sum(p.numel() for p in row.model.parameters()),
        "buckets": row.buckets,
        "paths": getattr(row, "paths", None),
    }
    holder.clear()
    del row
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def rank_main(rank, world, store_path, out_dir, config, rows):
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
    dist.init_process_group(
        backend,
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),  # a hang fails the run instead of blocking it
    )
    try:
        counter = CollectiveCounter()
        results = {name: measure_row(name, config, rank, world, device, counter) for name in rows}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"backend": backend, "device": str(device), "rows": results}, f)


def run_world(world, config, rows, timeout_s):
    """Spawns `world` ranks and returns each rank's results."""
    os.environ["OMP_NUM_THREADS"] = "1"  # read by each rank at start-up: one thread per rank
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        context = mp.start_processes(
            rank_main, args=(world, store, directory, config, rows), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise RuntimeError(f"world {world}: ranks still running after {timeout_s} s (a hang?)")
        per_rank = []
        for rank in range(world):
            with open(os.path.join(directory, f"rank{rank}.json")) as f:
                per_rank.append(json.load(f))
    return per_rank


def summarise(world, per_rank, name):
    """One table row from every rank's results: rank 0's bytes (checked equal on every rank and every
    counted step), the largest per-rank peak and masters + state, rank 0's step time."""
    results = [ranks["rows"][name] for ranks in per_rank]
    first = results[0]
    steps = first["bytes"]
    same_every_step = all(counted == steps[-1] for counted in steps)
    same_every_rank = all(r["bytes"][-1] == steps[-1] for r in results)
    totals = steps[-1]
    row = {
        "world": world,
        "row": name,
        "parameters": first["parameters"],
        "buckets": first["buckets"],
        "paths": first["paths"],
        "consistent": same_every_step and same_every_rank,
        "peak_bytes": max(r["peak_bytes"] for r in results),
        "masters_and_optimizer_bytes": max(r["masters_and_optimizer_bytes"] for r in results),
        "step_s": first["step_s"],
        "loss": first["loss"] if name in (ZERO1, UNSHARDED) else sum(r["loss"] for r in results),
    }
    for category in ("gradients", "parameters", "scalars"):
        calls = sum(c for key, (c, _) in totals.items() if key.endswith(category))
        nbytes = sum(b for key, (_, b) in totals.items() if key.endswith(category))
        kinds = sorted({key.split()[0] for key in totals if key.endswith(category)})
        row[f"{category}_calls"], row[f"{category}_bytes"], row[f"{category}_kinds"] = calls, nbytes, kinds
    row["total_bytes"] = sum(b for _, b in totals.values())
    # What each rank sends on the wire with ring algorithms: all-reduce 2(w-1)/w of the tensor,
    # reduce-scatter and all-gather (w-1)/w of the full tensor.
    ring = {"all-reduce": 2 * (world - 1) / world, "reduce-scatter": (world - 1) / world}
    ring["all-gather"] = ring["broadcast"] = ring["reduce-scatter"]
    row["ring_bytes"] = sum(b * ring[key.split()[0]] for key, (_, b) in totals.items())
    return row


def print_table(rows, config, backend, compiled):
    parameters = rows[0]["parameters"]
    print(
        f"\nGPT {config['layers']}x{config['width']} (vocab {config['vocab']}, {parameters:,} parameters), "
        f"{config['micro_batches']} micro-batches of {config['rows']}x{config['length']} tokens per rank, "
        f"AdamW; bucket {config['bucket_bytes'] / MIB:g} MiB (memengine bucket_bytes, DDP bucket_cap_mb); "
        f"backend {backend}; torch {torch.__version__}, git {_common.git_sha()}"
    )
    print(
        "bytes per step per rank, counted on the tensors handed to torch.distributed (all-reduce: the tensor, "
        "reduce-scatter: the input, all-gather: the output); DDP: through a comm hook (torch's allreduce_hook)"
    )
    header = [
        "world",
        "row",
        "gradients MiB (calls)",
        "param all-gather MiB (calls)",
        "scalars B (calls)",
        "ring MiB sent/rank",
        "masters+AdamW MiB/rank",
        "peak MiB/rank",
        "step s",
        "loss",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        gradient_kind = "/".join(row["gradients_kinds"]) or "-"
        print(
            f"| {row['world']} | {row['row']} | {row['gradients_bytes'] / MIB:.2f} ({row['gradients_calls']} "
            f"{gradient_kind}) | {row['parameters_bytes'] / MIB:.2f} ({row['parameters_calls']}) | "
            f"{row['scalars_bytes']} ({row['scalars_calls']}) | {row['ring_bytes'] / MIB:.2f} | "
            f"{row['masters_and_optimizer_bytes'] / MIB:.2f} | {row['peak_bytes'] / MIB:.2f} | "
            f"{row['step_s']:.2f} | {row['loss']:.4f} |"
            + ("" if row["consistent"] else " (bytes differ between steps or ranks!)")
        )
    if not compiled:
        print(f"\n{DDP_COMPILE}: {COMPILE_SKIPPED}")
    paths = {row["world"]: row["paths"] for row in rows if row["paths"]}
    print(f"memengine collective paths ({collectives.ENV_VAR}=native|fallback forces one): {paths}")


def write_csv(path, rows, config, backend):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = [
        "world",
        "row",
        "layers",
        "width",
        "parameters",
        "buckets",
        "gradients_bytes",
        "gradients_calls",
        "parameters_bytes",
        "parameters_calls",
        "scalars_bytes",
        "scalars_calls",
        "total_bytes",
        "ring_bytes",
        "masters_and_optimizer_bytes",
        "peak_bytes",
        "step_s",
        "loss",
        "backend",
        "torch",
        "git_sha",
    ]
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow(
                dict(
                    row,
                    layers=config["layers"],
                    width=config["width"],
                    backend=backend,
                    torch=torch.__version__,
                    git_sha=_common.git_sha(),
                )
            )
    print(f"appended {len(rows)} rows to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of ranks")
    parser.add_argument("--quick", action="store_true", help="a small model (a smoke run)")
    parser.add_argument("--compile", action="store_true", help=f"add the {DDP_COMPILE} row")
    parser.add_argument("--bucket-mib", type=float, default=4.0, help="bucket size of memengine and DDP")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per world size before it counts as hung")
    parser.add_argument("--csv", default=os.path.join(_common.ROOT, "benchmarks", "results", "data_parallel.csv"))
    args = parser.parse_args()
    config = dict(CONFIGS["quick" if args.quick else "default"], bucket_bytes=int(args.bucket_mib * MIB))
    worlds = args.worlds
    if torch.cuda.is_available():
        worlds = sorted({min(world, torch.cuda.device_count()) for world in worlds})  # one GPU per rank
    rows = [ZERO1, UNSHARDED, DDP] + ([DDP_COMPILE] if args.compile else [])
    table, backend = [], None
    for world in worlds:
        started = time.perf_counter()
        per_rank = run_world(world, config, rows, args.timeout)
        backend = per_rank[0]["backend"]
        print(f"world {world}: {time.perf_counter() - started:.0f} s", flush=True)
        table += [summarise(world, per_rank, name) for name in rows]
    print_table(table, config, backend, args.compile)
    write_csv(args.csv, table, config, backend)
    if not all(row["consistent"] for row in table) or any(math.isnan(row["loss"]) for row in table):
        raise SystemExit("some row's bytes differ between steps or ranks, or its loss is NaN: see the table")


if __name__ == "__main__":
    main()
