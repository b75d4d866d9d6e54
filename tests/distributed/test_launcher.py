"""The multi-rank harness itself: results come back, a raising rank fails with its traceback, a hang fails."""

import time

import pytest
import torch
import torch.distributed as dist
from distributed.launcher import RanksFailed, run_ranks


def _sum_of_ranks(rank, world):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def _hang_on_rank_zero(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_come_back_from_every_rank():
    assert [t.item() for t in run_ranks(2, _sum_of_ranks, timeout=60)] == [1.0, 1.0]


def test_a_raising_rank_fails_with_its_traceback():
    with pytest.raises(RanksFailed, match="rank one says no"):
        run_ranks(2, _raise_on_rank_one, timeout=60)


def test_a_hang_fails_instead_of_blocking():
    start = time.monotonic()
    with pytest.raises(RanksFailed, match="still running"):
        run_ranks(2, _hang_on_rank_zero, timeout=15)
    assert time.monotonic() - start < 40
