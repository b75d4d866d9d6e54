"""ZeRO-1 (MasterOptimizer(shard=True), the Engine's default with a process group) against unsharded data
parallelism and a single process: the same parameters (bitwise without clipping), param groups and weight
decay per parameter, optimizer memory divided by the world size, refusals, and state-dict layouts that the
plain runs do not reach. Two spawned 2-rank runs and one 4-rank run (rank functions: zero1_ranks.py)."""

import functools

import pytest
import torch
import torch.distributed as dist
from distributed import zero1_ranks as ranks
from distributed.dp_common import make_model, max_relative_difference
from distributed.launcher import run_ranks

import memengine as me

# The only difference clipping makes between the two: the global norm is a sum of the shards' sums of squares
# instead of one pass over the whole buffer, i.e. another fp32 summation order. A few ulps on the norm move
# the clip factor by as much, and SGD with momentum (zero1_ranks.SGD: why not Adam) carries that forward
# linearly: a few ulps per step. The single-process comparison differs by the order of the gradient sums.
FP32_ULP = torch.finfo(torch.float32).eps
NORM_TOLERANCE = 16 * FP32_ULP
PARAMETER_TOLERANCE = 16 * ranks.STEPS * FP32_ULP


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(2, ranks.zero1_against_unsharded, timeout=300)


@pytest.fixture(scope="module")
def four_rank_memory():
    return run_ranks(4, ranks.optimizer_memory, timeout=300)


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_parameters_bitwise_equal_to_unsharded_without_clipping(two_ranks, dtype):
    for rank_result in two_ranks:
        run = rank_result["runs"][(dtype, None)]
        for name in ("params", "masters"):
            for sharded, unsharded in zip(run[True][name], run[False][name], strict=True):
                assert torch.equal(sharded, unsharded), name
        norm_difference = max(abs(a - b) / b for a, b in zip(run[True]["norms"], run[False]["norms"], strict=True))
        assert norm_difference <= NORM_TOLERANCE  # the sums of squares are added in another order
    for a, b in zip(
        two_ranks[0]["runs"][(dtype, None)][True]["params"],
        two_ranks[1]["runs"][(dtype, None)][True]["params"],
        strict=True,
    ):
        assert torch.equal(a, b), "ranks disagree"


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_parameters_within_fp32_tolerance_with_clipping(two_ranks, dtype):
    run = two_ranks[0]["runs"][(dtype, ranks.CLIP_NORM)]
    assert min(run[True]["norms"]) > ranks.CLIP_NORM, "clipping never engaged: the test would prove nothing"
    norm_difference = max(abs(a - b) / b for a, b in zip(run[True]["norms"], run[False]["norms"], strict=True))
    masters_difference = max_relative_difference([run[True]["masters"]], [run[False]["masters"]])
    params_difference = max_relative_difference(run[True]["params"], run[False]["params"])
    print(
        f"\n{dtype} clipped: grad norm rel diff {norm_difference:.2e}, masters {masters_difference:.2e}, "
        f"params {params_difference:.2e}"
    )
    assert norm_difference <= NORM_TOLERANCE
    assert masters_difference <= PARAMETER_TOLERANCE
    if dtype == "torch.float32":
        assert params_difference <= PARAMETER_TOLERANCE
    for a, b in zip(run[True]["params"], two_ranks[1]["runs"][(dtype, ranks.CLIP_NORM)][True]["params"], strict=True):
        assert torch.equal(a, b), "ranks disagree"


def test_param_groups_apply_per_parameter(two_ranks):
    groups = two_ranks[0]["groups"]
    for sharded, unsharded in zip(groups["sharded"], groups["unsharded"], strict=True):
        assert torch.equal(sharded, unsharded)
    assert ranks.differences(groups["sharded_state"], groups["unsharded_state"]) == []
    single_process = max_relative_difference(groups["sgd_sharded"], groups["sgd_single_process"])
    without_groups = max_relative_difference(groups["sgd_ungrouped"], groups["sgd_single_process"])
    print(f"\ngroups: ZeRO-1 vs single process {single_process:.2e}; without the groups {without_groups:.2e}")
    assert single_process <= PARAMETER_TOLERANCE
    assert without_groups > 1000 * PARAMETER_TOLERANCE, "the groups made no difference: the test would prove nothing"


def test_weight_decay_moves_each_piece_by_its_own_group(two_ranks):
    """A zero-gradient AdamW step: decayed parameters scale by exactly (1 - lr * wd), the others do not move,
    including parameters whose elements are split between the two ranks' shards."""
    outcome = two_ranks[0]["decay_only"]
    factor = 1 - outcome["lr"] * ranks.WEIGHT_DECAY
    for before, after in zip(outcome["before"], outcome["after"], strict=True):
        expected = before.clone().mul_(factor) if before.dim() >= 2 else before
        assert torch.equal(after, expected)
        assert not torch.equal(after, before) or before.dim() < 2
    split = {index for index, *_ in two_ranks[0]["decay_only"]["pieces"]}
    split &= {index for index, *_ in two_ranks[1]["decay_only"]["pieces"]}
    assert split, "no parameter is split between the shards: the test would not exercise pieces"


@pytest.mark.parametrize("world", [2, 4])
def test_optimizer_memory_is_divided_by_world(two_ranks, four_rank_memory, world):
    measured = [result["memory"] for result in two_ranks] if world == 2 else four_rank_memory
    unsharded = measured[0]["unsharded"]
    for rank, memory in enumerate(measured):
        padding = memory["sharded"] * world / unsharded - 1
        print(
            f"\nworld {world} rank {rank}: {memory['parameters']} bf16 parameters in {memory['buckets']} buckets; "
            "masters + optimizer state "
            f"{memory['sharded']} B sharded, {unsharded} B unsharded data parallel, {memory['single_process']} B "
            f"single process; sharded x world / unsharded - 1 = {padding:.4%}"
        )
        assert memory["unsharded"] == unsharded
        # Masters and state are split exactly; the few bytes either way are the per-piece step counters.
        assert abs(padding) <= 0.01
        assert memory["sharded"] * world <= 1.01 * memory["single_process"]
        assert memory["buckets"] >= 3


def test_non_elementwise_optimizers_refused(two_ranks):
    refusals = two_ranks[0]["refusals"]
    for name in ("LBFGS", "lambda building LBFGS", "Adafactor"):
        if "missing" in refusals[name]:
            continue  # an older torch without Adafactor
        assert refusals[name].startswith("ValueError: MasterOptimizer(shard=True)"), refusals[name]
        assert "shard=False" in refusals[name]
    assert refusals["lambda building AdamW"] == "AdamW"


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a process without a process group")
def test_shard_without_process_group_refused():
    model = make_model()
    buffer = me.GradBuffer(model)
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        me.MasterOptimizer(torch.optim.AdamW, buffer, shard=True)
    buffer.release()
    with pytest.raises(ValueError, match="shard=True .* needs a process_group"):
        me.Engine(make_model(), functools.partial(torch.optim.AdamW, lr=1e-3), micro_batch_size=2, shard=True)


def test_edge_layouts_round_trip_through_consolidated_state_dict():
    """A rank whose shard is all padding, named param groups, a 0-dim parameter: the consolidated state dict is
    the unsharded one, loads back, and the next step matches, bit for bit."""
    results = run_ranks(2, ranks.edge_layouts, timeout=300)
    for rank_result in results:
        for name, checks in rank_result.items():
            for check, found in checks.items():
                assert found == [], f"{name}: {check}: {found[:3]}"
