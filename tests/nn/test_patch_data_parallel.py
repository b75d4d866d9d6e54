"""A patched model wrapped in torch's data parallelism (DDP, fully_shard) is refused with a clear
error, at patch time or at its first forward, never trained on a wrong gradient: DDP and FSDP reduce
.grad, not memengine's GradBuffer. The error names the fix: memengine.Engine(..., process_group=).
Two gloo ranks on 127.0.0.1, spawned by the test itself. FullyShardedDataParallel (FSDP1) needs an
accelerator to be constructed at all, so it is not run here: a patched model that FSDP1 flattens
fails the GradBuffer's coverage check (its parameters are replaced), and patching an FSDP1 module is
refused by its class (memengine.grad.hooks)."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import memengine as me

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

REFUSED = "DDP/FSDP/fully_shard"
FIX = "memengine.Engine(model, optimizer, micro_batch_size, process_group="  # memengine's own data parallelism


class Model(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.down(F.gelu(self.up(x))))


def error_of(action):
    try:
        action()
    except RuntimeError as error:
        return str(error)
    return None


def train_step(model, rank):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    model(x).square().sum().backward()


def ddp_wrapped_after_patch(rank, dtype):
    model = Model().to(dtype)
    me.patch(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    return error_of(lambda: train_step(ddp, rank))


def patch_of_a_ddp_module(rank):
    return error_of(lambda: me.patch(torch.nn.parallel.DistributedDataParallel(Model())))


def fully_shard_after_patch(rank, shard_only_a_submodule):
    from torch.distributed.fsdp import fully_shard

    model = Model()
    me.patch(model)
    fully_shard(model.up if shard_only_a_submodule else model)
    return error_of(lambda: train_step(model, rank))


def patch_of_a_fully_sharded_module(rank):
    from torch.distributed.fsdp import fully_shard

    model = Model()
    fully_shard(model)
    return error_of(lambda: me.patch(model))


CASES = {
    "ddp_fp32": lambda rank: ddp_wrapped_after_patch(rank, torch.float32),
    "ddp_bf16": lambda rank: ddp_wrapped_after_patch(rank, torch.bfloat16),
    "patch_of_ddp": patch_of_a_ddp_module,
    "fully_shard": lambda rank: fully_shard_after_patch(rank, False),
    "fully_shard_submodule": lambda rank: fully_shard_after_patch(rank, True),
    "patch_of_fully_shard": patch_of_a_fully_sharded_module,
}


def worker(rank, world_size, port, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        for name, case in CASES.items():
            try:
                results.put((rank, name, case(rank)))
            except Exception as error:  # an unexpected failure is reported, not hung on
                results.put((rank, name, f"unexpected {type(error).__name__}: {error}"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_wrappers_of_a_patched_model_are_refused_on_every_rank():
    world_size = 2
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=worker, args=(rank, world_size, free_port_once, results))
        for free_port_once in [free_port()]
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected = {}
    deadline = time.monotonic() + 120  # a hang fails the test (queue.Empty) instead of blocking the suite
    try:
        for _ in range(world_size * len(CASES)):
            rank, name, error = results.get(timeout=max(1.0, deadline - time.monotonic()))
            collected[rank, name] = error
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    for rank in range(world_size):
        for name in CASES:
            error = collected[rank, name]
            assert error is not None, f"rank {rank}, {name}: no error (the gradient would be silently wrong)"
            expected = ["DTensor"] if name == "fully_shard_submodule" else [REFUSED, FIX]
            assert all(text in error for text in expected) and "memengine" in error, f"rank {rank}, {name}: {error}"
