"""memengine.Engine under the launchers users run it with, not our test harness: torchrun (env:// rendezvous)
running examples/train_ddp.py, the example also as a plain single process, and torch.multiprocessing.spawn.
Each launch has a timeout, so a hang fails the test."""

import functools
import gc
import importlib.util
import math
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed.dp_common import (
    global_batch,
    make_model,
    max_relative_difference,
    rank_batch,
    summed_loss,
)

import memengine as me

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_ddp.py"
LAUNCH_TIMEOUT = 180  # seconds; a few steps of a tiny model take ~10 s on an idle 2-core machine
STEP_LINE = re.compile(r"^step (\d+) loss (\S+) grad_norm (\S+) tokens (\d+) world (\d+)$", re.MULTILINE)


def run_example(*arguments, launcher=()):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, str(EXAMPLE), *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def step_lines(output, steps, world):
    """The example's per-step lines, checked: one per step, in order, finite, over every rank's tokens."""
    lines = STEP_LINE.findall(output)
    assert [int(line[0]) for line in lines] == list(range(1, steps + 1)), output
    for _, loss, grad_norm, _, line_world in lines:
        assert math.isfinite(float(loss)) and math.isfinite(float(grad_norm)), output
        assert int(line_world) == world, output
    return [(float(loss), int(tokens)) for _, loss, _, tokens, _ in lines]


def load_example():
    spec = importlib.util.spec_from_file_location("train_ddp_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_under_torchrun_trains_two_ranks_and_saves_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint.pt"
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    start = time.monotonic()
    output = run_example("--steps", "3", "--save", str(checkpoint), launcher=torchrun)
    print(f"torchrun, 2 ranks, {time.monotonic() - start:.1f} s:\n{output}")
    steps = step_lines(output, steps=3, world=2)
    assert output.count("step 1 ") == 1, f"only rank 0 prints:\n{output}"
    # Each rank's batch holds rows * (LENGTH - 1) predicted tokens; the reported count is both ranks'.
    example = load_example()
    assert {tokens for _, tokens in steps} == {2 * 16 * (example.LENGTH - 1)}
    state = torch.load(checkpoint, weights_only=True)
    assert state["steps"] == 3
    # The consolidated checkpoint of 2 sharded ranks loads into a single-process Engine.
    model = example.build_model(torch.device("cpu"))
    single = me.Engine(model, torch.optim.AdamW, micro_batch_size=4)
    single.load_state_dict(state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_example_runs_as_a_single_process_without_torchrun():
    output = run_example("--steps", "2", "--no-shard")
    steps = step_lines(output, steps=2, world=1)
    assert {tokens for _, tokens in steps} == {16 * (load_example().LENGTH - 1)}


# --- torch.multiprocessing.spawn with env:// rendezvous -----------------------------------------------

WORLD, ROWS_PER_RANK, STEPS = 2, 4, 2


def _spawned_rank(rank, world, port, directory):
    """One rank started by mp.spawn: joins by env:// and trains STEPS steps; writes its parameters to a file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    try:
        _train_spawned_rank(rank, world, directory)
    finally:
        # The Engine holds the process group; it is gone (collected) before the group is destroyed, so that gloo's
        # objects are not torn down at interpreter exit instead (seen: an abort after a successful run).
        gc.collect()
        dist.destroy_process_group()


def _train_spawned_rank(rank, world, directory):
    model = make_model()
    trainer = sgd_engine(model, process_group=dist.group.WORLD)
    for step in range(STEPS):
        trainer.step(rank_batch(global_batch(step, world * ROWS_PER_RANK), rank, world), summed_loss)
    torch.save([p.detach().clone() for p in model.parameters()], os.path.join(directory, f"rank{rank}.pt"))


def sgd_engine(model, **options):
    # SGD, not AdamW: its update is proportional to the gradient, so a wrong normalisation across ranks shows
    # (AdamW is blind to a gradient's scale and turns rounding noise in a zero gradient into +-lr updates).
    return me.Engine(model, functools.partial(torch.optim.SGD, lr=0.5), micro_batch_size=2, **options)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_engine_under_multiprocessing_spawn_with_env_rendezvous(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks start from this environment
    context = mp.spawn(_spawned_rank, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not context.join(timeout=1):  # raises with a rank's traceback when one fails
            assert time.monotonic() < deadline, f"mp.spawn ranks still running after {LAUNCH_TIMEOUT} s: a hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b), "the ranks' parameters differ after the steps"
    reference = single_process_parameters(rank_order=[0, 1])
    # The tolerance is what reordering alone does: the same single-process Engine with the ranks' rows swapped.
    # It is not tiny: the attention key bias gets a gradient that is mathematically zero (softmax ignores a
    # constant added to every key's score), so it is pure rounding noise, which AdamW scales up to +-lr.
    reordering = max_relative_difference(single_process_parameters(rank_order=[1, 0]), reference)
    difference = max_relative_difference(first, reference)
    print(
        f"mp.spawn, 2 ranks: max relative difference {difference:.3g} to the single-process Engine "
        f"(reordering the rows in one process: {reordering:.3g})"
    )
    assert difference <= 2 * reordering, (
        f"max relative difference {difference:.3g} to the single-process Engine, more than twice what reordering "
        f"the rows in one process does ({reordering:.3g})"
    )


def single_process_parameters(rank_order):
    """The parameters after STEPS steps of a single-process Engine on each step's batch, the ranks' rows
    concatenated in `rank_order`."""
    model = make_model()
    trainer = sgd_engine(model)
    for step in range(STEPS):
        batch = global_batch(step, WORLD * ROWS_PER_RANK)
        shares = [rank_batch(batch, rank, WORLD) for rank in rank_order]
        trainer.step({key: torch.cat([share[key] for share in shares]) for key in batch}, summed_loss)
    return [p.detach().clone() for p in model.parameters()]
