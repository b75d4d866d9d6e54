"""Engine(budget=B) is a whole-step memory budget: the peak of everything one engine.step(batch)
allocates on the model's device (parameters, gradient buffer, optimizer state, batch,
activations inside and outside the repeated blocks, temporaries). On a small Hugging Face Llama:
for budgets from the smallest feasible one to the no-recompute peak, the measured whole-step
peak (memengine's allocator measurement) is within the budget and within 5 % of the prediction,
at the first step and once the optimizer state exists; training is unchanged; a budget at or
above the no-recompute peak warns once and recomputes nothing; one too small raises naming the
minimum and changes nothing."""

import functools
import warnings

import pytest
import torch

import memengine as me
from memengine.engine.step_memory import MemoryReport

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the CI installs it)")

VOCAB = 256
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def batches(steps=2):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (8, 64), generator=generator) for _ in range(steps)]


def train(budget, measure=True, steps=2):
    """(engine, per-step (loss, measured peak, report)) of `steps` steps of a fresh small Llama."""
    engine = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=budget, measure_memory=measure)
    results = []
    for batch in batches(steps):
        loss = engine.step(batch)["loss"]
        report = engine.memory_report() if measure else None
        results.append((loss, report))
    return engine, results


@pytest.fixture(scope="module")
def limits():
    """(smallest feasible, no-recompute peak, losses and parameters of training without a budget)."""
    engine, results = train(None)
    report = results[-1][1]
    assert report.measured_step == 2 and report.budget is None and report.plan == "keep 0-3"
    # activations are a meaningful share of the step: recomputation has room to matter
    assert report.smallest_feasible_budget < 0.7 * report.no_recompute_peak, report
    parameters = [p.detach().clone() for p in engine.model.parameters()]
    return report.smallest_feasible_budget, report.no_recompute_peak, [loss for loss, _ in results], parameters


def test_five_budgets_from_the_smallest_to_no_recompute_fit_and_are_predicted(limits):
    smallest, largest, losses, parameters = limits
    budgets = [smallest + (largest - 1 - smallest) * k // 4 for k in range(5)]
    plans = []
    for budget in budgets:
        engine, results = train(budget)
        for step, (_, report) in enumerate(results, start=1):
            predicted = report.predicted_first_step_peak if step == 1 else report.predicted_peak
            measured = report.measured_peak
            assert report.measured_step == step
            assert measured <= budget, (budget, step, str(report))
            assert abs(measured - predicted) <= 0.05 * measured, (budget, step, str(report))
        plans.append(report.plan)
        # recomputation changes no number: losses and parameters as without a budget
        assert all(torch.equal(a, b) for (a, _), b in zip(results, losses, strict=True)), budget
        assert all(torch.equal(p, q) for p, q in zip(engine.model.parameters(), parameters, strict=True)), budget
    assert plans[0] != plans[-1] and "keep 0-3" not in plans, plans  # every budget below the peak recomputes


def test_a_budget_at_the_no_recompute_peak_warns_once_and_recomputes_nothing(limits):
    _, largest, losses, _ = limits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, results = train(largest, measure=False)
    messages = [str(w.message) for w in caught if "nothing is recomputed" in str(w.message)]
    assert len(messages) == 1 and f"{largest:,} bytes" in messages[0], messages
    assert engine.segment_handle is None and engine.memory_report().plan == "keep 0-3"
    assert all(torch.equal(a, b) for (a, _), b in zip(results, losses, strict=True))


def test_a_budget_below_the_smallest_feasible_one_raises_naming_it_and_changes_nothing(limits):
    smallest, _, _, _ = limits
    model = llama()
    before = [p.detach().clone() for p in model.parameters()]
    engine = me.Engine(model, ADAMW, micro_batch_size=4, budget=smallest - 1)
    with pytest.raises(ValueError, match=f"at least {smallest:,} bytes"):
        engine.step(batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not engine.optimizer.state and engine.segment_handle is None
    # Resident bytes alone too large: the quoted minimum is still the feasible one (issue 19: it used to be a lower
    # bound, the resident bytes and optimizer step, which failed again when used), and 1 % above it trains.
    with pytest.raises(
        ValueError, match=f"resident bytes and the optimizer step alone exceed it.*at least {smallest:,}"
    ):
        me.Engine(model, ADAMW, micro_batch_size=4, budget="1KiB").step(batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    engine = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=int(smallest * 1.01))
    assert not engine.step(batches(1)[0])["skipped"]


def test_memory_report_breakdown_sums_to_the_prediction(limits):
    smallest, largest, _, _ = limits
    engine = me.Engine(llama(), ADAMW, micro_batch_size=4)
    with pytest.raises(ValueError, match="pass a batch"):
        engine.memory_report()
    for budget in (None, (smallest + largest) // 2):
        engine = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=budget)
        engine.step(batches(1)[0])
        report = engine.memory_report(batches(1)[0])
        assert isinstance(report, MemoryReport)
        assert sum(value for _, value in report.breakdown()) == report.predicted_peak
        parameter_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        assert report.parameters == parameter_bytes == report.gradient_buffer
        assert report.optimizer_state == 2 * parameter_bytes + 4 * len(list(engine.model.parameters()))
        table = str(report)
        assert "predicted peak" in table and "block activations" in table and report.plan in table


def test_the_recompute_plan_is_saved_and_restored_with_the_same_budget(limits):
    """Engine.state_dict() holds the plan; an Engine with the same budget applies it again on resume (with
    its prediction) rather than choosing afresh from new measurements, and training continues exactly."""
    smallest = limits[0]
    straight, _ = train(smallest, measure=False, steps=3)
    first, _ = train(smallest, measure=False, steps=2)
    saved = first.state_dict()
    chosen = [(segment.start, segment.end, segment.policy) for segment in first.memory_plan.plan]
    assert saved["plan"] == {"budget": smallest, "segments": chosen}
    assert any(policy != "keep" for _, _, policy in chosen), "the smallest budget recomputes something"
    # Another valid plan than the one chosen (the first half kept): restoring must apply it as saved.
    blocks = len(first.model.model.layers)
    other = [(0, blocks // 2, "keep"), (blocks // 2, blocks, "recompute")]
    assert other != chosen
    saved["plan"]["segments"] = other
    resumed = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=smallest)
    resumed.load_state_dict(saved)
    resumed.step(batches(3)[2])
    assert [(s.start, s.end, s.policy) for s in resumed.memory_plan.plan] == other
    for p, q in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        assert torch.equal(p, q)
    # Another budget plans anew.
    fresh = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=limits[1] * 2)
    fresh.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at or above the no-recompute peak: says nothing is recomputed
        fresh.step(batches(3)[2])
    assert all(s.policy == "keep" for s in fresh.memory_plan.plan)


def test_a_longer_batch_is_planned_again_and_every_step_fits_the_budget(limits):
    """The plan made on short sequences does not cover longer ones (issue 18: 1.14x over the budget): a batch
    with a shape no plan covers is planned anew, one a plan covers reuses it, and every step fits."""
    smallest, largest, _, _ = limits  # of 8 x 64 batches
    budget = (smallest + largest) // 2
    engine = me.Engine(llama(), ADAMW, micro_batch_size=4, budget=budget, measure_memory=True)
    generator = torch.Generator().manual_seed(2)
    plans = []
    for length in (16, 64, 16, 64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the short batch fits without recomputation, and says so
            engine.step(torch.randint(0, VOCAB, (8, length), generator=generator))
        report = engine.memory_report()
        assert report.measured_peak <= budget, (length, str(report))
        plans.append(report.plan)
    assert plans[0] == "keep 0-3" and plans[1] != plans[0], plans
    assert plans[2] == plans[3] == plans[1], "the longer batch's plan covers the shorter one: no third plan"


def test_a_percentage_budget_keeps_that_share_of_the_activations(limits):
    """Engine(budget="50%") means what the demo's --budget 50% and `plan --budget 50%` mean: the peak without
    recomputation less the other half of one micro-batch's activations; it recomputes, fits, changes no number."""
    _, largest, losses, parameters = limits
    engine, results = train("50%")
    report = results[-1][1]
    assert engine.budget == "50%"
    assert report.budget < largest and report.plan != "keep 0-3", str(report)
    assert report.measured_peak <= report.budget, str(report)
    assert all(torch.equal(a, b) for (a, _), b in zip(results, losses, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(engine.model.parameters(), parameters, strict=True))
    with pytest.raises(ValueError, match=r"1% of the activations .* is too small .* at least"):
        train("1%", measure=False, steps=1)
    for bad in ("0%", "150%", "half%", "-5MiB", 0):
        with pytest.raises(ValueError, match="budget|size"):
            me.Engine(llama(), ADAMW, micro_batch_size=4, budget=bad)
