"""me.plan: the optimal solver against exhaustive search under simulate(), the baselines, errors."""

import functools
import itertools
import random
import time

import pytest

from memengine import plan as me_plan
from memengine.ops import extension as _extension
from memengine.plan import Chain, Segment


def random_chain(rng, n):
    inputs = [rng.randint(1, 20) for _ in range(n)]
    input_saved = [rng.random() < 0.7 for _ in range(n)]
    saved = [rng.randint(1, 100) + (i if s else 0) for i, s in zip(inputs, input_saved, strict=True)]
    forward_time = [rng.uniform(0.5, 2.0) for _ in range(n)]
    return Chain(
        input_bytes=inputs,
        saved_bytes=saved,
        selective_bytes=[rng.randint(0, s) for s in saved],
        output_bytes=[rng.randint(1, 20) for _ in range(n)],
        forward_time=forward_time,
        selective_time=[rng.uniform(0.0, 0.5) for _ in range(n)],
        tail_time=[rng.uniform(0.0, t / 2) for t in forward_time],
        input_saved=input_saved,
        forward_extra_bytes=[rng.randint(0, 30) for _ in range(n)],
        backward_extra_bytes=[rng.randint(0, 60) for _ in range(n)],
    )


def all_plans(n):
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        pieces = list(zip(bounds, bounds[1:], strict=False))
        for policies in itertools.product(me_plan.POLICIES, repeat=len(pieces)):
            yield [Segment(s, e, p) for (s, e), p in zip(pieces, policies, strict=True)]


@functools.cache
def exhaustive_cases():
    """100 random chains of 1 to 8 blocks, each with simulate() of every possible plan."""
    rng = random.Random(0)
    cases = []
    for _ in range(100):
        chain = random_chain(rng, rng.randint(1, 8))
        cases.append((chain, [(me_plan.simulate(chain, p), p) for p in all_plans(len(chain))]))
    return cases


@pytest.fixture(params=["extension", "python"])
def solver(request, monkeypatch):
    """Runs the test with the dynamic program of memengine._C, then with the Python one."""
    if request.param == "extension" and _extension.C is None:
        pytest.skip(f"memengine._C is not loaded ({_extension.load_error})")
    if request.param == "python":
        monkeypatch.setattr(_extension, "C", None)
    return request.param


def test_optimal_equals_exhaustive_search_on_100_random_chains(solver):
    for trial, (chain, results) in enumerate(exhaustive_cases()):
        smallest = min(r["peak_bytes"] for r, _ in results)
        assert me_plan.smallest_feasible_budget(chain) == smallest, trial
        largest = max(r["peak_bytes"] for r, _ in results)
        for budget in (smallest, (smallest + largest) // 2, largest):
            best = min(r["recompute_cost"] for r, _ in results if r["peak_bytes"] <= budget)
            plan = me_plan.solve(chain, budget)
            result = me_plan.simulate(chain, plan)
            assert result["peak_bytes"] <= budget
            assert result["recompute_cost"] == pytest.approx(best, abs=1e-9), (trial, budget)
        with pytest.raises(me_plan.InfeasibleBudgetError, match=f"smallest feasible budget is {smallest} bytes"):
            me_plan.solve(chain, smallest - 1)


def test_baselines_and_report():
    chain = random_chain(random.Random(1), 9)
    assert me_plan.solve(chain, method="none") == [Segment(0, 9, "keep")]
    assert me_plan.solve(chain, method="all") == [Segment(i, i + 1, "recompute") for i in range(9)]
    assert me_plan.solve(chain, method="sqrt") == [
        Segment(0, 3, "recompute"),
        Segment(3, 6, "recompute"),
        Segment(6, 9, "keep"),
    ]
    assert me_plan.solve(chain, method="uniform", segment_blocks=4)[-1] == Segment(8, 9, "recompute")
    none = me_plan.simulate(chain, me_plan.solve(chain, method="none"))
    assert none["recompute_cost"] == 0
    optimal = me_plan.solve(chain, none["peak_bytes"])  # enough for everything: nothing recomputed
    assert me_plan.simulate(chain, optimal)["recompute_cost"] == 0
    text = me_plan.report(chain, me_plan.solve(chain, method="sqrt"))
    assert "recompute" in text and "predicted peak" in text
    with pytest.raises(ValueError, match="method must be one of"):
        me_plan.solve(chain, 10, method="greedy")
    with pytest.raises(ValueError, match="covers 3 of 9 blocks"):
        me_plan.simulate(chain, [Segment(0, 3, "keep")])


def test_128_blocks_solve_within_a_second():
    if _extension.C is None:
        pytest.skip(f"the 1 s bound is for the compiled solver; memengine._C is not loaded ({_extension.load_error})")
    chain = random_chain(random.Random(2), 128)
    budget = me_plan.simulate(chain, me_plan.solve(chain, method="sqrt"))["peak_bytes"]
    start = time.perf_counter()
    plan = me_plan.solve(chain, budget)
    elapsed = time.perf_counter() - start
    assert me_plan.simulate(chain, plan)["peak_bytes"] <= budget
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_profile_counts_saved_bytes_by_storage_without_parameters():
    import torch

    blocks = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)
    )
    chain = me_plan.profile(blocks, torch.randn(4, 8))
    assert chain.names == ["Linear", "ReLU", "LayerNorm", "Linear"]
    assert chain.input_bytes == [128, 256, 256, 256]
    # Linear saves its input (the weight is a parameter), ReLU its output, LayerNorm its input
    # plus mean and rstd ([4, 1] each), the last Linear its input.
    assert chain.saved_bytes == [128, 256, 256 + 2 * 16, 256]
    assert chain.input_saved == [True, False, True, True]
    # Selective holds each block's input and every matmul output (saved or not): ReLU's output is
    # recomputed.
    assert chain.selective_bytes == [128 + 256, 256, 256, 256 + 64]
    assert chain.output_bytes == [256, 256, 256, 64]
    assert chain.forward_flops == [2 * 4 * 8 * 16, 0, 0, 2 * 4 * 16 * 4]
    assert all(t > 0 for t in chain.forward_time)


def test_profile_on_the_meta_device_plans_a_large_model_from_shapes():
    import torch

    width, tokens = 4096, 4096
    with torch.device("meta"):  # 1.1 B parameters, never allocated
        blocks = torch.nn.Sequential(
            *[
                torch.nn.Sequential(
                    torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
                )
                for _ in range(8)
            ]
        )
    start = time.perf_counter()
    chain = me_plan.profile(blocks, torch.empty(tokens, width, device="meta", dtype=torch.float32))
    assert time.perf_counter() - start < 5
    hidden = tokens * width * 4
    assert chain.input_bytes == [hidden] * 8 and chain.output_bytes == [hidden] * 8
    # input (first block only: later inputs are outputs of a matmul and saved too), the first
    # Linear's output, GELU's input (the same storage) and GELU's output
    assert chain.saved_bytes[1] == hidden + 4 * hidden + 4 * hidden
    assert chain.forward_flops[0] == 2 * 2 * tokens * width * 4 * width
    budget = me_plan.simulate(chain, me_plan.solve(chain, method="sqrt"))["peak_bytes"]
    optimal = me_plan.simulate(chain, me_plan.solve(chain, budget))
    sqrt = me_plan.simulate(chain, me_plan.solve(chain, method="sqrt"))
    assert optimal["peak_bytes"] <= budget and optimal["recompute_cost"] <= sqrt["recompute_cost"]


def test_plan_command_plans_a_model_on_meta(capsys):
    from memengine.__main__ import main
    from memengine.segments import parse_bytes

    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("512M") == 512 * 2**20 and parse_bytes("100") == 100
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")
    args = ["plan", "--layers", "4", "--hidden", "256", "--heads", "4", "--seq", "128"]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--budget", "64MiB"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "baselines" in out and "sqrt" in out
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--budget", "1KiB"])
    assert exit_info.value.code == 1
    assert "smallest feasible budget is" in capsys.readouterr().out


def test_budget_strings_are_read_as_sizes_and_other_types_refused():
    """Engine(budget="6GiB") took strings; solve/segment crashed inside the compiled solver."""
    chain = random_chain(random.Random(2), 6)
    peak = me_plan.simulate(chain, me_plan.solve(chain, method="none"))["peak_bytes"]
    assert me_plan.solve(chain, f"{peak}B") == me_plan.solve(chain, peak)
    assert me_plan.solve(chain, "1TiB") == [Segment(0, 6, "keep")]
    with pytest.raises(TypeError, match="budget_bytes must be a byte count"):
        me_plan.solve(chain, [peak])
    with pytest.raises(ValueError, match="cannot read"):
        me_plan.solve(chain, "lots")
