"""me.segment on a real Hugging Face model: a small-config LlamaForCausalLM with random weights (no
download). Gradients bit-identical to the unsegmented model, and the measured peak of live bytes
drops by what the planner predicts."""

import copy

import pytest
import torch

import memengine as me
from memengine.plan import LiveBytes, Segment
from memengine.segments.apply import profile_sample as profile_recorded

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the CI installs it)")


def llama(layers=6, use_cache=False):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        use_cache=use_cache,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def step(model, tokens):
    """Loss, gradients and peak live bytes of one training step (parameter gradients preallocated)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with LiveBytes() as live:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], live.peak


def test_segment_a_llama_from_a_budget():
    model = llama()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    loss, grads, peak = step(model, tokens)

    layers = list(twin.model.layers)
    chain = profile_recorded(layers, lambda: twin(input_ids=tokens))
    keep_all = me.plan.simulate(chain, me.plan.solve(chain, method="none"))["peak_bytes"]
    budget = (keep_all + me.plan.smallest_feasible_budget(chain)) // 2
    handle = me.segment(twin.model.layers, budget=budget, sample=lambda: twin(input_ids=tokens))
    assert any(s.policy != "keep" for s in handle.plan)
    predicted = me.plan.simulate(handle.chain, handle.plan)
    assert predicted["peak_bytes"] <= budget
    segmented_loss, segmented_grads, segmented_peak = step(twin, tokens)

    assert torch.equal(loss, segmented_loss)
    for a, b in zip(grads, segmented_grads, strict=True):
        assert torch.equal(a, b)
    predicted_drop = keep_all - predicted["peak_bytes"]
    measured_drop = peak - segmented_peak
    assert abs(measured_drop - predicted_drop) <= 0.05 * predicted_drop, (measured_drop, predicted_drop)

    handle.remove()
    assert torch.equal(step(twin, tokens)[0], loss)
    assert "forward" not in twin.model.layers[0].__dict__


def test_key_value_cache_is_switched_off_for_recomputed_layers():
    model = llama(layers=4, use_cache=True)  # Hugging Face's default: a cache even in training
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(2))
    loss, grads, _ = step(model, tokens)
    plan = [Segment(0, 2, "recompute"), Segment(2, 3, "selective"), Segment(3, 4, "keep")]
    me.segment(twin.model.layers, plan=plan)
    with pytest.warns(UserWarning, match="use_cache.*switched off for recomputed blocks"):
        segmented_loss, segmented_grads, _ = step(twin, tokens)
    assert torch.equal(loss, segmented_loss)
    for a, b in zip(grads, segmented_grads, strict=True):
        assert torch.equal(a, b)
