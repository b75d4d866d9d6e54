"""MasterOptimizer and Engine: token normalisation across uneven micro-batches, clipping, fp16
loss scaling, and master weights."""

import functools
import io

import pytest
import torch
import torch.nn.functional as F
from token_batches import TinyLM, make_batch, summed_loss
from torch.utils._python_dispatch import TorchDispatchMode

import memengine as me


def test_uneven_micro_batches_give_the_full_batch_gradient():
    torch.manual_seed(0)
    reference = TinyLM()
    model = TinyLM()
    model.load_state_dict(reference.state_dict())
    batch = make_batch()
    loss_sum, tokens = summed_loss(reference, batch)
    (loss_sum / tokens).backward()  # the full-batch mean-loss gradient
    engine = me.Engine(model, optimizer=functools.partial(torch.optim.SGD, lr=0.0), micro_batch_size=4)
    stats = engine.step(batch, summed_loss)  # micro-batches of 4 and 2 rows, 22 and 5 real tokens
    assert not stats["skipped"] and int(stats["tokens"]) == int(tokens)
    torch.testing.assert_close(stats["loss"], (loss_sum / tokens).detach())
    flat_reference = torch.cat([p.grad.flatten() for p in reference.parameters()])
    flat = torch.cat([p.main_grad.flatten() for p in model.parameters()])
    relative_error = ((flat - flat_reference).norm() / flat_reference.norm()).item()
    assert relative_error <= 1e-5, relative_error
    torch.testing.assert_close(stats["grad_norm"], flat_reference.norm(), rtol=1e-5, atol=0)


def test_clipping_and_sgd_step_match_pytorch():
    torch.manual_seed(0)
    reference = TinyLM()
    model = TinyLM()
    model.load_state_dict(reference.state_dict())
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    engine = me.Engine(model, optimizer=functools.partial(torch.optim.SGD, lr=0.5), micro_batch_size=2, max_norm=0.1)
    for seed in range(3):
        batch = make_batch(seed=seed)
        reference_optimizer.zero_grad()
        loss_sum, tokens = summed_loss(reference, batch)
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
        reference_optimizer.step()
        engine.step(batch, summed_loss)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_model_with_master_weights_tracks_fp32_training():
    torch.manual_seed(0)
    reference = TinyLM()
    model = TinyLM().to(torch.bfloat16)
    model.load_state_dict(reference.state_dict())
    engine = me.Engine(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), micro_batch_size=3)
    assert all(p.grad is None for p in model.parameters())
    masters = [m for p, m in engine.optimizer.masters]
    assert all(m.dtype == torch.float32 for m in masters)
    for seed in range(3):
        stats = engine.step(make_batch(seed=seed), summed_loss)
        assert not stats["skipped"]
        # no bf16 gradient set, ever: .grad is None or the fp32 main_grad view
        assert all(p.grad is None or p.grad.data_ptr() == p.main_grad.data_ptr() for p in model.parameters())
    for p, master in engine.optimizer.masters:
        assert torch.equal(p, master.to(torch.bfloat16))  # refreshed from the masters
    state = engine.optimizer.state_dict()
    before = [m.detach().clone() for m in masters]
    engine.step(make_batch(seed=9), summed_loss)
    engine.optimizer.load_state_dict(state)
    for m, b in zip(masters, before, strict=True):
        assert torch.equal(m, b)
    for p, master in engine.optimizer.masters:
        assert torch.equal(p, master.to(torch.bfloat16))


def test_fp16_non_finite_gradient_skips_the_step_and_lowers_the_scale():
    torch.manual_seed(0)
    model = TinyLM().to(torch.float16)
    engine = me.Engine(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1), micro_batch_size=3)
    assert engine.loss_scale == 2.0**16
    weights = [p.detach().clone() for p in model.parameters()]

    def exploding_loss(model, batch):
        loss, tokens = summed_loss(model, batch)
        return loss * 1e30, tokens  # overflows in the fp16 backward

    stats = engine.step(make_batch(), exploding_loss)
    assert stats["skipped"] and engine.loss_scale == 2.0**15
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    stats = engine.step(make_batch(), summed_loss)
    assert not stats["skipped"] and torch.isfinite(stats["grad_norm"])
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_batch_splitting_errors():
    from memengine.engine import split_batch

    assert [t.shape[0] for t in split_batch(torch.zeros(5, 3), 2)] == [2, 2, 1]
    parts = split_batch((torch.zeros(4), {"a": torch.ones(4, 2)}), 3)
    assert len(parts) == 2 and parts[1][1]["a"].shape == (1, 2)
    with pytest.raises(ValueError, match="different numbers of rows"):
        split_batch({"a": torch.zeros(4), "b": torch.zeros(6)}, 2)
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        split_batch("text", 2)


def test_activation_budget_plans_the_blocks_and_changes_no_result():
    from memengine.models import GPT

    def gpt_loss(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"), tokens[:, 1:].numel()

    config = dict(vocab=64, width=32, layers=6, heads=4, length=16)
    torch.manual_seed(0)
    plain, budgeted = GPT(**config), GPT(**config)
    budgeted.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    # the budget is the whole step's peak: halfway between the smallest feasible one and no recompute
    probe = GPT(**config)
    report = me.Engine(probe, sgd, micro_batch_size=2).memory_report(tokens, gpt_loss)
    budget = (report.smallest_feasible_budget + report.no_recompute_peak) // 2
    engines = [me.Engine(plain, sgd, micro_batch_size=2), me.Engine(budgeted, sgd, micro_batch_size=2, budget=budget)]
    for _ in range(2):
        losses = [engine.step(tokens, gpt_loss)["loss"] for engine in engines]
        assert torch.equal(*losses)
    for a, b in zip(plain.parameters(), budgeted.parameters(), strict=True):
        assert torch.equal(a, b)
    handle = engines[1].segment_handle
    assert handle.blocks == list(budgeted.blocks) and any(s.policy != "keep" for s in handle.plan)
    assert engines[1].memory_report().predicted_peak <= budget
    assert engines[0].segment_handle is None
    with pytest.raises(ValueError, match="no list of repeated blocks found in TinyLM"):
        me.Engine(TinyLM(), sgd, micro_batch_size=2, budget=1 << 20).step(make_batch(), summed_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_engine_state_dict_resumes_bit_identically_in_a_fresh_engine(dtype):
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2)
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    engine = me.Engine(model, adamw, micro_batch_size=4, max_norm=1.0, growth_interval=2)
    for seed in range(3):
        engine.step(make_batch(seed=seed), summed_loss)
    file = io.BytesIO()
    torch.save(engine.state_dict(), file)
    file.seek(0)
    torch.manual_seed(1)
    resumed = me.Engine(TinyLM().to(dtype), adamw, micro_batch_size=4, max_norm=1.0, growth_interval=2)
    resumed.load_state_dict(torch.load(file))
    assert resumed.loss_scale == engine.loss_scale
    for seed in range(3, 6):
        stats = engine.step(make_batch(seed=seed), summed_loss)
        resumed_stats = resumed.step(make_batch(seed=seed), summed_loss)
        assert torch.equal(stats["loss"], resumed_stats["loss"]) and stats["loss_scale"] == resumed_stats["loss_scale"]
    for (name, p), q in zip(engine.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    for (_, master), (_, resumed_master) in zip(engine.optimizer.masters, resumed.optimizer.masters, strict=True):
        assert torch.equal(master, resumed_master)


def test_lr_scheduler_over_the_engine_optimizer_reaches_the_step():
    # The same learning rates set by hand on a twin engine must give the same parameters.
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    torch.manual_seed(0)
    scheduled, by_hand = TinyLM(), TinyLM()
    by_hand.load_state_dict(scheduled.state_dict())
    engine, twin = me.Engine(scheduled, sgd, micro_batch_size=3), me.Engine(by_hand, sgd, micro_batch_size=3)
    scheduler = torch.optim.lr_scheduler.StepLR(engine.optimizer, step_size=1, gamma=0.1)
    for seed in range(3):
        twin.optimizer.param_groups[0]["lr"] = 0.5 * 0.1**seed
        engine.step(make_batch(seed=seed), summed_loss)
        twin.step(make_batch(seed=seed), summed_loss)
        scheduler.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    for a, b in zip(scheduled.parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b)


class TensorsFromPythonNumbers(TorchDispatchMode):
    """Counts tensors made from Python data (torch.tensor / torch.as_tensor of a number): on a GPU
    each is a blocking host-to-device copy."""

    FROM_HOST_DATA = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.FROM_HOST_DATA or func in (torch.ops.aten.scalar_tensor.default,)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("python_count", [True, False], ids=["python-count", "tensor-count"])
def test_token_counts_make_no_tensor_from_a_python_number_per_micro_batch(python_count):
    def loss_fn(model, batch):
        loss, tokens = summed_loss(model, batch)
        return loss, int(tokens) if python_count else tokens

    batch = make_batch()
    counts, results = [], []
    for micro_batch_size in (6, 1):  # one and six micro-batches
        torch.manual_seed(0)
        engine = me.Engine(TinyLM(), functools.partial(torch.optim.SGD, lr=0.1), micro_batch_size=micro_batch_size)
        with TensorsFromPythonNumbers() as mode:
            stats = engine.step(batch, loss_fn)
        counts.append(mode.count)
        results.append(stats)
    assert counts[1] == counts[0] == 0, counts
    for stats in results:
        assert stats["tokens"].dtype == torch.float64 and int(stats["tokens"]) == int((batch["labels"] != -100).sum())


def test_token_counts_of_mixed_kinds_sum_exactly():
    batch = make_batch()
    kinds = iter([5, torch.tensor(3), 2.0, torch.tensor(7, dtype=torch.int32), 1, 4])

    def loss_fn(model, micro_batch):
        loss, _ = summed_loss(model, micro_batch)
        return loss, next(kinds)

    engine = me.Engine(TinyLM(), functools.partial(torch.optim.SGD, lr=0.1), micro_batch_size=1)
    stats = engine.step(batch, loss_fn)
    assert stats["tokens"].dtype == torch.float64 and stats["tokens"].item() == 22.0
    with pytest.raises(TypeError, match="num_tokens"):
        engine.step(batch, lambda model, micro_batch: (summed_loss(model, micro_batch)[0], "7"))


class HugeGradient(torch.nn.Module):
    """loss = sum(weight) * 3e37: every gradient element is 3e37 (finite), their L2 norm over 1024
    elements is about 9.6e38, beyond float32's largest value (3.4e38)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1024))

    def forward(self, batch):
        return self.weight.sum() * 3e37


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_a_step_whose_gradient_norm_overflows_float32_is_skipped(max_norm):
    model = HugeGradient()
    engine = me.Engine(model, functools.partial(torch.optim.SGD, lr=1e-40), micro_batch_size=1, max_norm=max_norm)
    stats = engine.step(torch.zeros(1, 1), lambda model, batch: (model(batch), 1))
    assert torch.isfinite(model.weight.main_grad).all()  # each gradient element is finite
    assert stats["skipped"]  # a clipped-to-zero or unclipped step would be silently wrong
    assert torch.equal(model.weight, torch.zeros(1024))


def test_engine_over_a_model_patched_before_a_parameter_was_unfrozen_is_refused():
    model = TinyLM()
    model.mix.requires_grad_(False)
    me.patch(model)
    model.mix.requires_grad_(True)  # its gradient would never reach the buffer the Engine steps from
    with pytest.raises(RuntimeError, match="'mix.weight' requires grad but is not in the GradBuffer"):
        me.Engine(model, functools.partial(torch.optim.SGD, lr=0.1), micro_batch_size=2)


class BranchyLM(TinyLM):
    """TinyLM with a branch that only some steps use (its parameters get no gradient in the others)."""

    def __init__(self):
        super().__init__()
        self.branch = torch.nn.Linear(16, 16)
        self.use_branch = True

    def forward(self, tokens):
        h = self.embed(tokens)
        if self.use_branch:
            h = h + self.branch(h)
        return self.head(self.norm(h + torch.tanh(self.mix(h))))


@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["no-clipping", "clipping"])
def test_a_step_without_some_gradients_matches_pytorch(max_norm):
    """Step 1 uses the branch, step 2 does not: step 2's norm, clipping and AdamW update (weight decay
    included) must ignore the branch, whose parameters plain PyTorch leaves alone (.grad None)."""
    torch.manual_seed(0)
    reference, model = BranchyLM(), BranchyLM()
    model.load_state_dict(reference.state_dict())
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    reference_optimizer = adamw(reference.parameters())
    engine = me.Engine(model, adamw, micro_batch_size=3, max_norm=max_norm)
    for step, use_branch in enumerate([True, False]):
        reference.use_branch = model.use_branch = use_branch
        batch = make_batch(seed=step)
        reference_optimizer.zero_grad()
        loss, tokens = summed_loss(reference, batch)
        (loss / tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm if max_norm else float("inf"))
        reference_optimizer.step()
        stats = engine.step(batch, summed_loss)
        torch.testing.assert_close(stats["grad_norm"], norm, rtol=1e-5, atol=0)
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")


def test_static_loss_scale_is_undone_exactly():
    """A power-of-two loss scale is exact in fp32: parameters match an Engine without one bit for bit."""
    torch.manual_seed(0)
    plain, scaled = TinyLM(), TinyLM()
    scaled.load_state_dict(plain.state_dict())
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    engines = [me.Engine(m, sgd, micro_batch_size=4, loss_scale=s) for m, s in ((plain, None), (scaled, 2.0**10))]
    for seed in range(2):
        results = [engine.step(make_batch(seed=seed), summed_loss) for engine in engines]
        assert torch.equal(results[0]["grad_norm"], results[1]["grad_norm"])
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q)


def test_dynamic_loss_scale_grows_after_growth_interval_good_steps():
    torch.manual_seed(0)
    model = TinyLM().to(torch.float16)
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    engine = me.Engine(model, sgd, micro_batch_size=3, growth_interval=2, initial_loss_scale=2.0**4)
    scales = []
    for seed in range(4):
        assert not engine.step(make_batch(seed=seed), summed_loss)["skipped"]
        scales.append(engine.loss_scale)
    assert scales == [2.0**4, 2.0**5, 2.0**5, 2.0**6]
