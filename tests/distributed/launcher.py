"""Runs a function on several ranks, each a fresh process (torch.multiprocessing's spawn) in a gloo
process group on this machine, and returns what each rank returned.

    results = run_ranks(world, fn, *args, timeout=120, group_timeout=None)

fn(rank, world, *args) runs after torch.distributed.init_process_group("gloo") (a FileStore in a
temporary directory: no port to pick); it must be importable by module name (a module-level function
of a module under tests/, which spawn re-imports) and return something picklable (tensors are
sent as their bytes: see `portable`). OMP_NUM_THREADS=1 and one intra-op thread per rank.

group_timeout: the process group's own timeout in seconds (init_process_group(timeout=)), after which a
collective that waits for a missing rank raises; None: torch's default (30 minutes for gloo).

A rank that raises fails the call with its traceback; ranks still running `timeout` seconds after
the start are killed and the call fails naming them, so a hang fails the test instead of blocking CI.
"""

import datetime
import gc
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


class RanksFailed(AssertionError):
    pass


def portable(value):
    """value with every tensor replaced by a CPU copy that pickles without shared memory (a dead process
    cannot hand over a shared-memory tensor)."""
    if isinstance(value, torch.Tensor):
        return _Bytes(value)
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(item) for item in value)
    return value


def restored(value):
    if isinstance(value, _Bytes):
        return value.tensor()
    if isinstance(value, dict):
        return {key: restored(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(restored(item) for item in value)
    return value


class _Bytes:
    def __init__(self, tensor):
        tensor = tensor.detach().cpu().contiguous()
        self.dtype, self.shape = tensor.dtype, tuple(tensor.shape)
        self.data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""

    def tensor(self):
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)


def _rank_main(rank, world, store_path, fn, args, results, env, group_timeout):
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        options = {} if group_timeout is None else {"timeout": datetime.timedelta(seconds=group_timeout)}
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world, **options)
        try:
            value = fn(rank, world, *args)
        finally:
            gc.collect()  # Engines in reference cycles hold the group: free them before it is destroyed
            dist.destroy_process_group()
        results.put((rank, "ok", portable(value)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(world, fn, *args, timeout=120, env=None, group_timeout=None):
    """[fn's result on rank 0, on rank 1, ...]; see the module docstring."""
    context = mp.get_context("spawn")
    results = context.Queue()
    child_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    saved = {key: os.environ.get(key) for key in child_env}
    os.environ.update(child_env)  # spawned children start from this process's environment
    with tempfile.TemporaryDirectory() as directory:
        store = os.path.join(directory, "store")
        try:
            processes = [
                context.Process(
                    target=_rank_main, args=(rank, world, store, fn, args, results, child_env, group_timeout)
                )
                for rank in range(world)
            ]
            for process in processes:
                process.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        outcomes = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < world:
                try:
                    rank, status, value = results.get(timeout=0.5)
                    outcomes[rank] = (status, value)
                    if status == "error":
                        break
                    continue
                except queue.Empty:
                    pass
                dead = [r for r, p in enumerate(processes) if r not in outcomes and p.exitcode not in (None, 0)]
                if dead:
                    raise RanksFailed(
                        f"rank(s) {dead} died without a result (exit codes {[processes[r].exitcode for r in dead]})"
                    )
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(outcomes))
                    raise RanksFailed(f"rank(s) {missing} of {world} still running after {timeout} s: a hang")
        finally:
            for process in processes:
                process.join(timeout=0 if len(outcomes) < world else 10)
                if process.is_alive():
                    process.kill()
                    process.join()
    errors = {rank: value for rank, (status, value) in outcomes.items() if status == "error"}
    if errors:
        rank = min(errors)
        raise RanksFailed(f"rank {rank} of {world} raised:\n{errors[rank]}")
    return [restored(outcomes[rank][1]) for rank in range(world)]
