"""Regression tests of issue 18's single-process silent failures, each against plain PyTorch doing the same:

1. a step with zero tokens raises and leaves nothing behind (the buffer used to become NaN, gaps included,
   and every later step was skipped);
6. weights changed after the MasterOptimizer / Engine exists (model.load_state_dict, an init function, an
   in-place edit, a .data assignment) are trained from, not reverted to the stale masters;
9. a model cast or moved after memengine.patch raises a clear error instead of torch's or a kernel's;
and grad_stats_ measured in pieces (ZeRO-1's shards) follows grad_stats_'s overflow rule exactly.
"""

import functools

import pytest
import torch
from token_batches import TinyLM, make_batch, summed_loss

import memengine as me
from memengine import ops
from memengine.models.gpt import GPT


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyLM().to(dtype)


def no_tokens(batch):
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def sgd(lr=0.5):
    return functools.partial(torch.optim.SGD, lr=lr)


def plain_sgd_steps(model, batches, lr=0.5):
    """Plain PyTorch: full-batch mean loss, SGD (fp32 model, the reference of an fp32 Engine)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for batch in batches:
        optimizer.zero_grad()
        loss, tokens = summed_loss(model, batch)
        (loss / tokens).backward()
        optimizer.step()


# -- 1. zero-token steps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_zero_token_step_raises_and_leaves_nothing_behind(dtype):
    model, twin = tiny(dtype), tiny(dtype)
    engine = me.Engine(model, sgd(), micro_batch_size=2, max_norm=1.0)
    untouched = me.Engine(twin, sgd(), micro_batch_size=2, max_norm=1.0)
    batches = [make_batch(seed=seed) for seed in range(3)]
    engine.step(batches[0], summed_loss)
    untouched.step(batches[0], summed_loss)
    for _ in range(2):  # caught by the loop, which goes on
        with pytest.raises(ValueError, match="token counts sum to 0"):
            engine.step(no_tokens(batches[1]), summed_loss)
        assert torch.isfinite(engine.buffer.data).all(), "the failed step left non-finite values in the buffer"
    for batch in batches[1:]:
        stats = engine.step(batch, summed_loss)
        assert not stats["skipped"]
        untouched.step(batch, summed_loss)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), "training after a zero-token step differs from training without it"


def test_micro_batches_without_tokens_count_for_nothing():
    """A step whose first micro-batch has no tokens (all prompt) equals plain PyTorch on the whole batch."""
    model, reference = tiny(), tiny()
    batch = make_batch(rows=4)
    batch["labels"][:2] = -100
    me.Engine(model, sgd(), micro_batch_size=2).step(batch, summed_loss)
    plain_sgd_steps(reference, [batch])
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- 6. weights changed after the optimizer exists -----------------------------------------------------------
def load_checkpoint(model, weights):
    model.load_state_dict(weights)


def init_function(model, weights):
    model.apply(lambda module: torch.nn.init.normal_(module.weight, std=0.1) if hasattr(module, "weight") else None)


def in_place_edit(model, weights):
    with torch.no_grad():
        model.mix.weight.mul_(0.5)


def data_assignment(model, weights):
    model.mix.weight.data = model.mix.weight.data * 0.5


CHANGES = [load_checkpoint, init_function, in_place_edit, data_assignment]


@pytest.mark.parametrize("change", CHANGES, ids=[change.__name__ for change in CHANGES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weights_changed_after_the_engine_is_built_are_trained_from(change, dtype):
    weights = tiny(dtype, seed=1).state_dict()
    batches = [make_batch(seed=seed) for seed in range(2)]
    model = tiny(dtype)
    engine = me.Engine(model, sgd(lr=0.0), micro_batch_size=2)
    torch.manual_seed(5)  # the init function draws
    change(model, weights)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    engine.step(batches[0], summed_loss)  # lr 0: the weights must stay as they were changed to
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), f"{name} was reverted to the stale master"
    # and with a learning rate, they train like an Engine built after the change
    engine.optimizer.param_groups[0]["lr"] = 0.5
    engine.step(batches[1], summed_loss)
    fresh = tiny(dtype)
    fresh.load_state_dict(expected)
    me.Engine(fresh, sgd(lr=0.5), micro_batch_size=2).step(batches[1], summed_loss)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_master_optimizer_state_dict_after_a_weight_change_holds_the_new_weights():
    model = tiny(torch.bfloat16)
    optimizer = me.MasterOptimizer(torch.optim.AdamW, me.patch(model), lr=1e-3)
    weights = tiny(torch.bfloat16, seed=1).state_dict()
    model.load_state_dict(weights)
    masters = optimizer.state_dict()["master_weights"]
    resumed = tiny(torch.bfloat16, seed=2)
    resumed_optimizer = me.MasterOptimizer(torch.optim.AdamW, me.patch(resumed), lr=1e-3)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    assert masters.dtype == torch.float32
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_refresh_masters_after_an_edit_through_data():
    """An in-place edit of parameter.data bumps no version counter: refresh_masters() is the documented fix."""
    model = tiny(torch.bfloat16)
    engine = me.Engine(model, sgd(lr=0.0), micro_batch_size=2)
    model.mix.weight.data.mul_(0.5)
    edited = model.mix.weight.detach().clone()
    engine.optimizer.refresh_masters()
    engine.step(make_batch(), summed_loss)
    assert torch.equal(model.mix.weight, edited)


# -- 9. a cast or move after patch ---------------------------------------------------------------------------
@pytest.mark.parametrize("after_backward", [False, True], ids=["fresh", "mid-window"])
def test_a_cast_after_patch_raises_naming_the_parameter_and_the_fix(after_backward):
    model = tiny()
    me.patch(model)
    batch = make_batch()
    if after_backward:
        summed_loss(model, batch)[0].backward()
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"changed from torch.float32 on cpu to torch.bfloat16.*unpatch"):
        summed_loss(model, batch)[0].backward()
    me.unpatch(model)  # the fix the error names: unpatch, (cast,) patch again
    buffer = me.patch(model)
    summed_loss(model, batch)[0].backward()
    assert all(buffer.received_gradient(p) for p in buffer.params)


def test_a_cast_after_the_engine_is_built_raises_at_the_next_step():
    model = tiny()
    engine = me.Engine(model, sgd(), micro_batch_size=2)
    engine.step(make_batch(), summed_loss)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="changed from torch.float32"):
        engine.step(make_batch(), summed_loss)


# -- grad_stats_ in pieces -------------------------------------------------------------------------------------
CASES = {
    "ordinary": [1.0, -2.0, 3.0, 0.5, 0.25],
    "square overflows float32": [2e20, -1e20, 3e20, 1.0, 0.0],
    "whole norm overflows, pieces do not": [2.5e38, 0.0, 2.5e38, 1.0, 0.0],
    "a piece overflows": [3e38, 3e38, 1.0, 2.0, 0.0],
    "non-finite values": [float("nan"), 1.0, float("inf"), 2.0, 3.0],
}


@pytest.mark.parametrize("values", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("cut", [1, 2, 3])
def test_grad_stats_in_pieces_equals_grad_stats_of_the_whole(values, cut):
    whole = torch.tensor(values, dtype=torch.float32)
    pieces = [whole[:cut].clone(), whole[cut:].clone()]
    expected = ops.grad_stats_(whole.clone(), 1.0)
    combined = ops.combine_grad_stats(ops.grad_stats_in_pieces([ops.grad_stats_(piece, 1.0) for piece in pieces]))
    assert torch.equal(combined[1], expected[1]), (combined, expected)
    torch.testing.assert_close(combined[0], expected[0], rtol=1e-6, atol=0)


# -- measure_memory hides nothing (issue 19, item 4) -----------------------------------------------------------
def test_measure_memory_lets_the_loss_fn_s_stderr_through(capfd):
    """The CPU measurement runs the step under the profiler, whose start and stop lines are silenced; what the
    step itself writes to file descriptor 2 (a loss_fn's prints, warnings) must still be seen."""
    import os

    def loss_fn(model, batch):
        os.write(2, b"written by loss_fn\n")
        return summed_loss(model, batch)

    torch.manual_seed(0)
    model = GPT(vocab=30, width=16, layers=2, heads=2, length=7)  # measure_memory plans over its blocks
    engine = me.Engine(model, sgd(), micro_batch_size=3, measure_memory=True)
    engine.step(make_batch(), loss_fn)
    captured = capfd.readouterr().err
    assert captured.count("written by loss_fn") == 3, captured  # the planning sample and two micro-batches
    assert "profiler_start" not in captured
