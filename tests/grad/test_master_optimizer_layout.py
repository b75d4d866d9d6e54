"""MasterOptimizer state dicts do not depend on the GradBuffer's bucket layout: "master_weights" is saved in
the canonical (unbucketed) layout, so a state dict from a data-parallel buffer (buckets padded for the world
size) loads into a single-process one and back, and the two are the same dict."""

import functools

import pytest
import torch

import memengine as me
from memengine.grad.buffer import layout
from memengine.models.gpt import GPT

# Small buckets padded for 4 ranks: several buckets, parameters at other offsets than the canonical layout's.
BUCKETED = {"bucket_bytes": 4096, "bucket_multiple": 4}
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def trained(seed=0, steps=2, **bucketing):
    """A bf16 GPT patched with the given buffer layout and stepped `steps` times by a MasterOptimizer."""
    torch.manual_seed(seed)
    model = GPT(vocab=64, width=32, layers=2, heads=2, length=12).to(torch.bfloat16)
    buffer = me.patch(model, **bucketing)
    optimizer = me.MasterOptimizer(ADAMW, buffer)
    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens).float().square().mean().backward()
        buffer.finish_window()
        optimizer.step()
    return model, buffer, optimizer


def assert_same_state_dict(actual, expected):
    assert torch.equal(actual["master_weights"], expected["master_weights"])
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, values in expected["state"].items():
        assert actual["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(actual["state"][index][key], value), (index, key)


def test_bucketed_layout_is_not_the_canonical_one():
    _, buffer, _ = trained(steps=0, **BUCKETED)
    offsets, total, _ = layout(buffer.params)
    assert len(buffer.buckets) >= 3
    assert buffer.offsets != offsets and buffer.data.numel() > total


def test_master_weights_are_saved_in_the_canonical_layout():
    model, buffer, optimizer = trained(**BUCKETED)
    saved = optimizer.state_dict()["master_weights"]
    offsets, total, _ = layout(buffer.params)
    assert saved.numel() == total
    for (p, master), offset in zip(optimizer.masters, offsets, strict=True):
        assert torch.equal(saved[offset : offset + p.numel()], master.detach().reshape(-1))
        assert torch.equal(p, master.detach().to(p.dtype))
    _, _, single = trained()
    assert_same_state_dict(optimizer.state_dict(), single.state_dict())  # identical arithmetic, layout aside


def test_state_dict_moves_between_bucketed_and_single_process_buffers():
    bucketed_model, _, bucketed = trained(**BUCKETED)
    saved = bucketed.state_dict()

    single_model, _, single = trained(seed=1, steps=1)  # other weights and state, all to be replaced
    single.load_state_dict(saved)
    assert_same_state_dict(single.state_dict(), saved)
    for a, b in zip(single_model.parameters(), bucketed_model.parameters(), strict=True):
        assert torch.equal(a, b)

    back_model, _, back = trained(seed=2, steps=1, **BUCKETED)
    back.load_state_dict(single.state_dict())
    assert_same_state_dict(back.state_dict(), saved)
    assert torch.equal(back.master_data, bucketed.master_data)  # the padding slots stay zero
    for a, b in zip(back_model.parameters(), bucketed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_keyed_by_strings_is_taken_by_index():
    """torch.distributed.checkpoint hands state dicts back with string keys ("0", "1", ...); torch.optim would keep
    such state aside unused and restart AdamW from nothing. MasterOptimizer.load_state_dict takes them by index."""
    _, _, saved = trained(steps=2)
    state = saved.state_dict()
    as_strings = {**state, "state": {str(index): values for index, values in state["state"].items()}}
    _, _, fresh = trained(steps=0)
    fresh.load_state_dict(as_strings)
    assert_same_state_dict(fresh.state_dict(), state)
    _, _, other = trained(steps=0)
    with pytest.raises(ValueError, match="not by parameter index"):
        other.load_state_dict({**state, "state": {"embed.weight": state["state"][0]}})
