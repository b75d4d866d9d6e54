"""Ranks agree or all fail (issue 18): what happens across gloo ranks when their steps differ.

- a parameter used on some ranks only, and one a rank stops using while another still uses it, against a
  single process on the whole batch (these catch the "received anywhere" and "stale window" mutations of
  tests/mutation_check.py);
- a graph change on one rank, an exception from loss_fn on one rank (at different steps on different
  ranks) or on every rank, ranks at different step numbers, weights loaded on one rank only: every rank
  raises a clear error promptly (within 10 s, with a process-group timeout of 60 s, so a hang fails the
  test), no rank steps, and a loop that catches the errors and goes on trains exactly as a single process
  that skipped those steps;
- ZeRO-1 with named (name, parameter) groups, one of which is empty on some rank, and with a gradient
  norm whose square overflows float32 (it must be clipped as a single process clips it).

Each run_ranks call trains every scenario of one kind on 2 ranks (spawning is the expensive part). SGD
keeps the comparison with the single-process reference tight: the data-parallel gradient is the same
per-token mean summed in another order, so parameters agree to fp32 rounding (RELATIVE_TOLERANCE).
"""

import functools
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed.launcher import run_ranks

import memengine as me

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

VOCAB, WIDTH, LENGTH = 64, 32, 12
ROWS_PER_RANK, MICRO_BATCH_SIZE, WORLD = 4, 2, 2
RELATIVE_TOLERANCE = 1e-5
PROMPT_SECONDS = 10  # the bound for every rank to have raised
GROUP_TIMEOUT = 60  # the process group's own timeout: a collective waiting for a missing rank fails after it
TIMEOUT = 400  # seconds per spawn: generous for a CPU shared with other test runs; a hang still fails


class GatedModel(torch.nn.Module):
    """A small LM with a parameter used only on flagged micro-batches (`extra`: data-dependent, as a
    mixture-of-experts router makes it) and a head that can be applied twice (a graph change)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.body = torch.nn.Linear(WIDTH, WIDTH)
        self.extra = torch.nn.Linear(WIDTH, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        self.head_uses = 1

    def forward(self, tokens, flags):
        x = self.embed(tokens)
        x = x + torch.tanh(self.body(x))
        if bool(flags.any()):
            x = x + torch.tanh(self.extra(x)) * flags[:, None, None]
        hidden = self.norm(x)
        return sum(self.head(hidden) for _ in range(self.head_uses))


def summed_loss(model, batch, multiplier=1.0):
    logits = model(batch["tokens"], batch["flags"]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
    return loss * multiplier, (batch["labels"] != -100).sum()


def global_batch(step, flagged_rows=()):
    """The step's batch of WORLD * ROWS_PER_RANK rows (rows of rank r: [r * ROWS_PER_RANK, (r + 1) *
    ROWS_PER_RANK)), each with a different number of labelled tokens; `flagged_rows` use `extra`."""
    rows = WORLD * ROWS_PER_RANK
    generator = torch.Generator().manual_seed(4321 + step)
    tokens = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
    labels = tokens.roll(-1, dims=1)
    keep = torch.randint(1, LENGTH + 1, (rows,), generator=generator)
    for row in range(rows):
        labels[row, keep[row] :] = -100
    flags = torch.zeros(rows)
    flags[list(flagged_rows)] = 1.0
    return {"tokens": tokens, "labels": labels, "flags": flags}


def rank_rows(batch, rank):
    return {key: value[rank * ROWS_PER_RANK : (rank + 1) * ROWS_PER_RANK] for key, value in batch.items()}


def build(group=None, shard=True, max_norm=None, overlap=True, param_groups=None):
    model = GatedModel()
    options = (
        {} if group is None else {"process_group": group, "shard": shard, "overlap": overlap, "bucket_bytes": 4096}
    )
    engine = me.Engine(
        model,
        functools.partial(torch.optim.SGD, lr=0.5),
        micro_batch_size=MICRO_BATCH_SIZE,
        max_norm=max_norm,
        param_groups=None if param_groups is None else param_groups(model),
        **options,
    )
    return model, engine


def parameters_of(model):
    return [p.detach().clone() for p in model.parameters()]


# -- parameters used on some ranks only ------------------------------------------------------------------------
# Rows 0-3 are rank 0's (micro-batches of rows 0-1 and 2-3), rows 4-7 rank 1's. Step 0: both ranks use `extra`
# in their last micro-batch (so overlap=True learns one contribution); step 1: only rank 1 does (rank 0's slice
# still holds step 0's gradient unless its window is closed before the reduction); step 2: only rank 1's first
# micro-batch does (rank 1 gets fewer contributions than it learned).
FLAGS = {0: (2, 3, 6), 1: (6, 7), 2: (4,)}


def train_flagged(group=None, rank=0, shard=True, overlap=True):
    model, engine = build(group, shard=shard, overlap=overlap)
    history = []
    for step, flagged in FLAGS.items():
        batch = global_batch(step, flagged)
        engine.step(batch if group is None else rank_rows(batch, rank), summed_loss)
        history.append(parameters_of(model))
    return history


# -- ranks that disagree -----------------------------------------------------------------------------------------
def timed_step(engine, batch, loss_fn):
    """("ok", stats) or (exception type name, message, seconds the failing step took)."""
    start = time.monotonic()
    try:
        stats = engine.step(batch, loss_fn)
    except Exception as error:  # noqa: BLE001 - the test reports whatever each rank raised
        notes = "\n".join(getattr(error, "__notes__", []))
        return (type(error).__name__, f"{error}\n{notes}", time.monotonic() - start)
    return ("ok", {"tokens": float(stats["tokens"]), "loss": float(stats["loss"])})


def disagreement_ranks(rank, world):
    group = dist.group.WORLD
    results = {}

    # (4a) A graph change on rank 0 only, with overlap: rank 0's readiness raises mid-backward.
    model, engine = build(group)
    outcomes = []
    for step in range(3):
        model.head_uses = 2 if (step == 1 and rank == 0) else 1
        outcomes.append(timed_step(engine, rank_rows(global_batch(step), rank), summed_loss))
    results["graph change on one rank"] = {"outcomes": outcomes, "parameters": parameters_of(model)}

    # (4b) loss_fn raises on rank 0 at step 1 and on rank 1 at step 2; on both at step 3; the loop goes on.
    failing = {(0, 1), (1, 2), (0, 3), (1, 3)}

    def loss_fn(step):
        def compute(model, micro_batch):
            if (rank, step) in failing:
                raise ValueError(f"bad batch on rank {rank} at step {step}")
            return summed_loss(model, micro_batch)

        return compute

    for shard in (True, False):
        model, engine = build(group, shard=shard)
        outcomes = [timed_step(engine, rank_rows(global_batch(step), rank), loss_fn(step)) for step in range(5)]
        results[f"exceptions, shard={shard}"] = {"outcomes": outcomes, "parameters": parameters_of(model)}

    # Ranks at different step numbers: rank 1 resumes from a state saved one step later.
    model, engine = build(group)
    engine.step(rank_rows(global_batch(0), rank), summed_loss)
    state = engine.state_dict()
    state["steps"] += rank
    engine.load_state_dict(state)
    results["different step numbers"] = {
        "outcomes": [timed_step(engine, rank_rows(global_batch(1), rank), summed_loss)]
    }

    # Weights loaded on rank 0 only, then on every rank.
    loaded = {key: value + 0.01 for key, value in GatedModel().state_dict().items()}
    model, engine = build(group)
    if rank == 0:
        model.load_state_dict(loaded)
    outcomes = [timed_step(engine, rank_rows(global_batch(0), rank), summed_loss)]
    model.load_state_dict(loaded)
    outcomes.append(timed_step(engine, rank_rows(global_batch(0), rank), summed_loss))
    results["weights loaded"] = {"outcomes": outcomes, "parameters": parameters_of(model)}
    return results


def zero1_ranks(rank, world):
    group = dist.group.WORLD
    results = {}
    for shard in (True, False):
        for overlap in (True, False):
            results[f"flagged, shard={shard}, overlap={overlap}"] = train_flagged(group, rank, shard, overlap)

    # Uneven rows (rank 1 has one micro-batch, rank 0 two) and, at step 1, a rank without any token.
    model, engine = build(group)
    for step in range(2):
        engine.step(uneven_rows(step, rank), summed_loss)
    results["uneven rows, no tokens on rank 1"] = parameters_of(model)

    model, engine = build(group, param_groups=named_groups)
    results["named groups sizes"] = [len(group["params"]) for group in engine.optimizer.param_groups]
    for step in range(2):
        engine.step(rank_rows(global_batch(step), rank), summed_loss)
    results["named groups"] = parameters_of(model)

    model, engine = build(group, max_norm=1.0)
    stats = engine.step(rank_rows(global_batch(0), rank), functools.partial(summed_loss, multiplier=1e22))
    results["overflowing square"] = {"parameters": parameters_of(model), "grad_norm": float(stats["grad_norm"])}
    return results


def uneven_batch(step):
    """Rows 0-3 (rank 0) and 4-5 (rank 1) of the step's batch; at step 1 rank 1's rows have no labelled token."""
    batch = {key: value[:6] for key, value in global_batch(step).items()}
    if step == 1:
        batch["labels"][4:] = -100
    return batch


def uneven_rows(step, rank):
    batch = uneven_batch(step)
    rows = slice(0, 4) if rank == 0 else slice(4, 6)
    return {key: value[rows] for key, value in batch.items()}


def named_groups(model):
    """Two named groups; the second holds only the LayerNorm's bias, 32 elements: one rank's shards hold none."""
    named = list(model.named_parameters())
    return [
        {"params": [(name, p) for name, p in named if name != "norm.bias"], "weight_decay": 0.0},
        {"params": [(name, p) for name, p in named if name == "norm.bias"], "lr": 0.1},
    ]


@pytest.fixture(scope="module")
def disagreement_runs():
    return run_ranks(WORLD, disagreement_ranks, timeout=TIMEOUT, group_timeout=GROUP_TIMEOUT)


@pytest.fixture(scope="module")
def zero1_runs():
    return run_ranks(WORLD, zero1_ranks, timeout=TIMEOUT, group_timeout=GROUP_TIMEOUT)


def assert_close_to(params, reference, name):
    for index, (a, b) in enumerate(zip(params, reference, strict=True)):
        difference = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert difference <= RELATIVE_TOLERANCE, f"{name}: parameter {index} differs by {difference:.3g}"


def assert_identical_across_ranks(per_rank, name):
    for a, b in zip(per_rank[0], per_rank[1], strict=True):
        assert torch.equal(a, b), f"{name}: the ranks' parameters differ"


def single_process(steps, loss_fn=summed_loss, load=None, **options):
    model, engine = build(**options)
    if load is not None:
        model.load_state_dict(load)
    for step in steps:
        engine.step(global_batch(step), loss_fn)
    return parameters_of(model)


def assert_failed_promptly(outcome, expected_type, must_mention):
    assert outcome[0] == expected_type, outcome
    assert must_mention in outcome[1], outcome[1]
    assert outcome[2] < PROMPT_SECONDS, f"the failing step took {outcome[2]:.1f} s"


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", [True, False], ids=["zero1", "unsharded"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "after-backward"])
def test_parameter_used_on_some_ranks_only_matches_single_process(zero1_runs, shard, overlap):
    name = f"flagged, shard={shard}, overlap={overlap}"
    per_rank = [result[name] for result in zero1_runs]
    expected = train_flagged()
    for step, reference in enumerate(expected):
        assert_identical_across_ranks([history[step] for history in per_rank], f"{name}, step {step}")
        assert_close_to(per_rank[0][step], reference, f"{name}, step {step}")


def test_graph_change_on_one_rank_fails_every_rank_promptly(disagreement_runs):
    first, second = (result["graph change on one rank"]["outcomes"] for result in disagreement_runs)
    assert first[0][0] == second[0][0] == "ok"
    assert_failed_promptly(first[1], "RuntimeError", "head.weight received contribution")
    assert_failed_promptly(second[1], "StepFailedOnAnotherRank", "raised an exception on rank(s) [0]")
    assert first[2][0] == second[2][0] == "ok", "the step after the failed one trains on every rank"
    assert_identical_across_ranks([r["graph change on one rank"]["parameters"] for r in disagreement_runs], "4a")
    assert_close_to(disagreement_runs[0]["graph change on one rank"]["parameters"], single_process([0, 2]), "4a")


@pytest.mark.parametrize("shard", [True, False], ids=["zero1", "unsharded"])
def test_exceptions_on_some_ranks_fail_every_rank_and_the_loop_stays_in_step(disagreement_runs, shard):
    name = f"exceptions, shard={shard}"
    first, second = (result[name]["outcomes"] for result in disagreement_runs)
    # Step 1: rank 0's loss_fn raised; step 2: rank 1's; step 3: both.
    assert_failed_promptly(first[1], "ValueError", "every other rank raises StepFailedOnAnotherRank")
    assert_failed_promptly(second[1], "StepFailedOnAnotherRank", "rank(s) [0]")
    assert_failed_promptly(first[2], "StepFailedOnAnotherRank", "rank(s) [1]")
    assert_failed_promptly(second[2], "ValueError", "bad batch on rank 1 at step 2")
    assert_failed_promptly(first[3], "ValueError", "bad batch on rank 0 at step 3")
    assert_failed_promptly(second[3], "ValueError", "bad batch on rank 1 at step 3")
    for outcomes in (first, second):
        assert outcomes[0][0] == outcomes[4][0] == "ok"
        # The global token count of step 4 is step 4's, not a mix of two steps' (the issue saw 64 for 59).
        batch = global_batch(4)
        assert outcomes[4][1]["tokens"] == int((batch["labels"] != -100).sum())
    assert_identical_across_ranks([result[name]["parameters"] for result in disagreement_runs], name)
    assert_close_to(disagreement_runs[0][name]["parameters"], single_process([0, 4], shard=shard), name)


def test_ranks_at_different_step_numbers_all_raise(disagreement_runs):
    for result in disagreement_runs:
        (outcome,) = result["different step numbers"]["outcomes"]
        assert_failed_promptly(outcome, "StepFailedOnAnotherRank", "different steps")


def test_weights_loaded_on_one_rank_only_raise_everywhere_then_load_on_all_trains_from_them(disagreement_runs):
    loaded = {key: value + 0.01 for key, value in GatedModel().state_dict().items()}
    for result in disagreement_runs:
        first, second = result["weights loaded"]["outcomes"]
        assert_failed_promptly(first, "StepFailedOnAnotherRank", "weights were changed")
        assert second[0] == "ok"
    assert_identical_across_ranks([r["weights loaded"]["parameters"] for r in disagreement_runs], "weights")
    expected = single_process([0], load=loaded)
    assert_close_to(disagreement_runs[0]["weights loaded"]["parameters"], expected, "weights loaded on every rank")


def test_uneven_rows_and_a_rank_without_tokens_match_single_process(zero1_runs):
    name = "uneven rows, no tokens on rank 1"
    assert_identical_across_ranks([result[name] for result in zero1_runs], name)
    model, engine = build()
    for step in range(2):
        engine.step(uneven_batch(step), summed_loss)
    assert_close_to(zero1_runs[0][name], parameters_of(model), name)


def test_zero1_named_groups_with_a_group_empty_on_one_rank(zero1_runs):
    sizes = [result["named groups sizes"] for result in zero1_runs]
    assert any(size[1] == 0 for size in sizes), f"no rank has the small group empty: {sizes}"
    assert_identical_across_ranks([r["named groups"] for r in zero1_runs], "named groups")
    assert_close_to(zero1_runs[0]["named groups"], single_process([0, 1], param_groups=named_groups), "named groups")


def test_zero1_clips_a_norm_whose_square_overflows_float32(zero1_runs):
    expected_model, engine = build(max_norm=1.0)
    stats = engine.step(global_batch(0), functools.partial(summed_loss, multiplier=1e22))
    reference_norm = float(stats["grad_norm"])
    assert 1.8e19 < reference_norm < 3e38, "the norm must be finite in float32 but its square not"
    for result in zero1_runs:
        overflow = result["overflowing square"]
        assert overflow["grad_norm"] == pytest.approx(reference_norm, rel=1e-5)
        assert_close_to(overflow["parameters"], parameters_of(expected_model), "overflowing square")
