"""Exact resume: 6 steps straight against 3 steps, save, new processes, load, 3 steps — single-process and
2-rank ZeRO-1 (bf16 and fp16 with a moving loss scale; AdamW moments and step counts) — and a 2-rank
consolidated state dict (torch.save, and torch.distributed.checkpoint) loaded on 1 rank (a single-process
Engine, a 1-rank ZeRO-1 Engine) and on 4 ranks, whose next step matches the 2-rank run's. Spawned runs: 2, 2,
4 and 1 ranks (rank functions: zero1_ranks.py)."""

import pytest
import torch
from distributed import zero1_ranks as ranks
from distributed.dp_common import max_relative_difference
from distributed.launcher import run_ranks

# The next step on another world size differs from the 2-rank one only in the order its gradients are summed
# (rows per micro-batch, micro-batches per rank, ranks): a few fp32 ulps of each gradient element, which one
# AdamW step (eps 1e-4: zero1_ranks.RESUME_OPTIMIZER) passes on scaled by at most lr / eps = 100, i.e. about
# 1e-7 x |gradient| / |parameter| relative (measured: 3.7e-9). Losing any saved state (moments, step counts,
# masters) moves parameters by ~lr = 1e-2, ~3e-3 relative.
NEXT_STEP_TOLERANCE = 64 * torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def two_rank_save(directory):
    return run_ranks(2, ranks.zero1_straight_and_save, directory, timeout=300)


@pytest.fixture(scope="module")
def single_process(two_rank_save):
    return two_rank_save[0]["single_process"]


@pytest.fixture(scope="module")
def two_rank_resume(directory, two_rank_save):
    return run_ranks(2, ranks.zero1_resume, directory, timeout=300)


@pytest.fixture(scope="module")
def one_rank(directory, two_rank_save):
    return run_ranks(1, ranks.load_consolidated_elsewhere, directory, timeout=300)[0]


@pytest.fixture(scope="module")
def four_ranks(directory, two_rank_save):
    return run_ranks(4, ranks.load_consolidated_elsewhere, directory, timeout=300)


def assert_equal_tensors(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype_name", list(ranks.RESUME_DTYPES))
def test_single_process_resume_in_a_new_process_is_bitwise(single_process, one_rank, dtype_name):
    expected = single_process[dtype_name]
    resumed = one_rank["single-process resume"][dtype_name]
    assert resumed["loaded"] == expected["saved_state"]
    assert_equal_tensors(resumed["params"], expected["after_6"])
    assert resumed["state"] == expected["state_6"]
    assert expected["state_6"]["steps"] == 6
    if dtype_name == "fp16":  # the loss scale and its counter were restored, not restarted
        assert expected["saved_state"]["loss_scale"] != ranks.FP16_OPTIONS["initial_loss_scale"]
        assert expected["saved_state"]["good_steps"] > 0


@pytest.mark.parametrize("dtype_name", list(ranks.RESUME_DTYPES))
def test_zero1_resume_on_the_same_ranks_is_bitwise(two_rank_save, two_rank_resume, dtype_name):
    for rank in range(2):
        saved, resumed = two_rank_save[rank][dtype_name], two_rank_resume[rank]
        assert_equal_tensors(resumed[f"{dtype_name} loaded"]["params"], saved["after_3"])
        assert resumed[f"{dtype_name} loaded"]["state"] == saved["saved_state"]
        assert_equal_tensors(resumed[dtype_name]["params"], saved["after_6"])
        assert resumed[dtype_name]["state"] == saved["state_6"]
        assert saved["state_6"]["steps"] == 6
    assert_equal_tensors(two_rank_resume[0]["bf16"]["params"], two_rank_resume[1]["bf16"]["params"])


def test_zero1_shard_of_another_rank_or_world_size_is_refused(two_rank_resume, one_rank, four_ranks):
    for rank, outcome in enumerate(two_rank_resume):
        for dtype_name in ranks.RESUME_DTYPES:
            message = outcome[f"{dtype_name} other rank's shard"]
            assert message.startswith(
                f"ValueError: MasterOptimizer(shard=True).load_state_dict: this is the shard of rank {1 - rank} of 2"
            ), message
            assert "consolidated_state_dict()" in message
    for outcome in [one_rank, *four_ranks]:
        assert outcome["shard of rank 0 of 2"].startswith("ValueError: MasterOptimizer(shard=True)")
    # a single-process Engine has no shards at all
    message = one_rank["single-process shard into single process"]
    assert message.startswith("ValueError: Engine.load_state_dict: the optimizer state is the ZeRO-1 shard"), message


def test_consolidated_state_dict_loads_on_one_and_four_ranks(two_rank_save, one_rank, four_ranks):
    expected = two_rank_save[0]["bf16"]["masters_4"]
    loads = {f"1 rank, {key}": value for key, value in one_rank.items() if " from " in key}
    for rank, outcome in enumerate(four_ranks):
        loads.update({f"4 ranks (rank {rank}), {key}": value for key, value in outcome.items() if " from " in key})
    assert len(loads) == 4 + 4 * 2  # 1 rank: zero1 and single_process, 4 ranks: zero1; each from both sources
    for name, masters in loads.items():
        difference = max_relative_difference([masters], [expected])
        print(f"\nnext step after loading the 2-rank consolidated state dict, {name}: max rel diff {difference:.2e}")
        assert difference <= NEXT_STEP_TOLERANCE, name
    for outcome in [one_rank, *four_ranks]:  # DCP and torch.save hand over the same state
        assert torch.equal(outcome["zero1 from dcp"], outcome["zero1 from torch.save"])


def test_dcp_round_trip_is_the_torch_save_state_dict(one_rank, four_ranks):
    for outcome in [one_rank, *four_ranks]:
        assert outcome["dcp vs torch.save"] == []


def test_single_process_state_dict_loads_into_zero1(single_process, two_rank_save):
    """The consolidated format is the single-process format: a single-process save loads into a 2-rank ZeRO-1
    Engine, whose consolidated_state_dict() is then that save exactly, and whose next step matches."""
    for outcome in two_rank_save:
        loaded = outcome["from_single_process"]
        assert loaded["consolidated vs single-process"] == []
        difference = max_relative_difference([loaded["masters_4"]], [single_process["bf16"]["masters_4"]])
        print(f"\n2-rank ZeRO-1 step after loading a single-process save: max rel diff {difference:.2e}")
        assert difference <= NEXT_STEP_TOLERANCE


def test_saved_files_hold_what_the_run_had(directory, two_rank_save):
    """Per-rank files carry the steps counter and the layout; the consolidated file has every parameter's state."""
    shard = torch.load(ranks.shard_path(directory, "bf16", 1, 2), weights_only=True)
    assert shard["steps"] == 3 and shard["optimizer"]["shard"]["rank"] == 1
    consolidated = torch.load(ranks.consolidated_path(directory, "bf16"), weights_only=True)
    assert consolidated["steps"] == 3 and "shard" not in consolidated["optimizer"]
    model = ranks.resume_engine("bf16").model
    assert len(consolidated["optimizer"]["state"]) == len(list(model.parameters()))
    assert all(int(state["step"]) == 3 for state in consolidated["optimizer"]["state"].values())
