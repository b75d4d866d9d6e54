"""`python -m memengine info` reports which data-parallel collective paths run on each torch.distributed
backend: probed in this process on a one-rank group that it makes and destroys, never left initialised,
never probing a process group that is already there (its other ranks would not join the collective).
The rest of info's output is tested in tests/ops/test_backend.py."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from memengine.cli import info
from memengine.distributed import collectives

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
PATHS = {collectives.NATIVE, collectives.FALLBACK}


def test_gloo_paths_are_probed_and_no_process_group_is_left():
    report = info.collective_paths()
    assert set(report["gloo"]) == {"reduce_scatter", "all_gather"}, report
    assert set(report["gloo"].values()) <= PATHS, report
    assert not dist.is_initialized(), "info left a process group initialised"
    if not torch.cuda.is_available():
        assert report["nccl"] == "not probed: CUDA is not available"


def test_forced_path_is_what_info_reports(monkeypatch):
    monkeypatch.setenv(collectives.ENV_VAR, collectives.FALLBACK)
    report = info.collective_paths()
    assert report["setting"] == collectives.FALLBACK
    assert report["gloo"] == {"reduce_scatter": collectives.FALLBACK, "all_gather": collectives.FALLBACK}


def test_a_bad_setting_is_reported_not_raised_and_no_group_is_left(monkeypatch):
    monkeypatch.setenv(collectives.ENV_VAR, "sometimes")
    report = info.collective_paths()
    assert "must be auto, native or fallback" in report["gloo"], report
    assert not dist.is_initialized()


def test_an_existing_process_group_is_not_probed_nor_destroyed():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        report = info.collective_paths()
        assert report["gloo"] == "not probed: this process already has a default process group"
        assert dist.is_initialized() and dist.group.WORLD is group
    finally:
        dist.destroy_process_group()


def test_info_command_prints_the_collective_paths():
    env = {key: value for key, value in os.environ.items() if key != collectives.ENV_VAR}
    result = subprocess.run(
        [sys.executable, "-m", "memengine", "info"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    heading = lines.index(f"data-parallel collectives ({collectives.ENV_VAR}=auto; probed on a one-rank group):")
    gloo = lines[heading + 1].split()
    assert gloo[:2] == ["gloo", "reduce_scatter"] and gloo[2].rstrip(",") in PATHS, lines[heading + 1]
    assert lines[heading + 2].split()[0] == "nccl"
