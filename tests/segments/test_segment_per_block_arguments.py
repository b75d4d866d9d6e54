"""me.segment's recomputed segments call every block with its own arguments: per-layer masks
(alternating attention types), keyword arguments that differ per layer and forward pre-hooks on
any block apply, as without a plan (loss and gradients bit-identical). A hidden state the model
changes between two blocks of one segment is refused at forward time; an exception or an early
exit between a segment's blocks leaves nothing installed; no-grad forwards, RNG drawn between
blocks and an outer checkpoint around the whole model work."""

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.plan import Segment

WIDTH = 12


class Layer(torch.nn.Module):
    def __init__(self, attention_type):
        super().__init__()
        self.attention_type = attention_type
        self.attn = torch.nn.Linear(WIDTH, WIDTH)
        self.mlp = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, hidden, mask, scale=1.0, position=None):
        h = hidden + torch.tanh(self.attn(hidden)) * mask * scale
        if position is not None:
            h = h + position
        return h + F.dropout(self.mlp(h), p=0.2, training=self.training), None


class Decoder(torch.nn.Module):
    """Hugging Face's loop over its layers, each given the mask of its attention type and its own scale.

    between(index, hidden) runs after layer `index` and returns the next layer's input;
    stop_after ends the loop early."""

    def __init__(self, layers=6, between=None, stop_after=None):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer("full" if i % 2 == 0 else "sliding") for i in range(layers))
        self.between, self.stop_after = between, stop_after

    def forward(self, x):
        mask_by_type = {"full": torch.ones(WIDTH), "sliding": torch.linspace(-1, 1, WIDTH)}
        position = torch.linspace(0, 1, WIDTH)
        for index, layer in enumerate(self.layers):
            x, _ = layer(x, mask_by_type[layer.attention_type], scale=1.0 + index, position=position)
            if self.between is not None:
                x = self.between(index, x)
            if index == self.stop_after:
                break
        return x


PLANS = {
    "three, two, keep": [Segment(0, 3, "recompute"), Segment(3, 5, "recompute"), Segment(5, 6, "keep")],
    "one segment": [Segment(0, 6, "recompute")],
    "selective and recompute": [Segment(0, 2, "selective"), Segment(2, 6, "recompute")],
}


def twins(**decoder_kwargs):
    torch.manual_seed(0)
    model = Decoder(**decoder_kwargs)
    twin = Decoder(**decoder_kwargs)
    twin.load_state_dict(model.state_dict())
    return model, twin


def step(model, x, seed=0):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def assert_same_step(model, twin, x):
    expected_loss, expected_grads = step(model, x)
    loss, grads = step(twin, x)
    assert torch.equal(loss, expected_loss)
    for a, b in zip(expected_grads, grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)  # None: a layer an early exit skipped


def no_hooks_left():
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


@pytest.mark.parametrize("plan", list(PLANS))
def test_each_block_gets_its_own_arguments(plan):
    model, twin = twins()
    handle = me.segment(twin.layers, plan=PLANS[plan])
    x = torch.randn(5, WIDTH)
    assert_same_step(model, twin, x)
    assert_same_step(model, twin, x)  # a second step on the same handle
    assert no_hooks_left()
    handle.remove()
    assert_same_step(model, twin, x)


def test_forward_pre_hook_on_a_non_head_block_applies():
    def halve_mask(module, args, kwargs):
        hidden, mask = args
        return (hidden, mask * 0.5), {**kwargs, "scale": kwargs["scale"] + 1.0}

    model, twin = twins()
    for m in (model, twin):
        m.layers[1].register_forward_pre_hook(halve_mask, with_kwargs=True)
    me.segment(twin.layers, plan=PLANS["three, two, keep"])
    assert_same_step(model, twin, torch.randn(5, WIDTH))


@pytest.mark.parametrize("where", ["model code", "pre-hook"])
def test_hidden_state_changed_between_blocks_of_a_segment_is_refused(where):
    if where == "model code":
        model = Decoder(between=lambda index, hidden: hidden * 2 if index == 0 else hidden)
    else:
        model = Decoder()
        model.layers[1].register_forward_pre_hook(lambda module, args: (args[0] * 2, *args[1:]))
    me.segment(model.layers, plan=PLANS["three, two, keep"])
    with pytest.raises(RuntimeError, match=r"block 1 .*block 0.*changed between.*separate segments"):
        model(torch.randn(5, WIDTH))
    assert no_hooks_left()
    with torch.no_grad():
        model(torch.randn(5, WIDTH))  # without grad nothing is recomputed: fine


def test_exception_between_blocks_leaves_nothing_installed():
    fail = [True]

    def between(index, hidden):
        if index == 1 and fail[0]:
            raise KeyError("interrupted")
        return hidden

    model, twin = twins(between=between)
    me.segment(twin.layers, plan=PLANS["three, two, keep"])
    with pytest.raises(KeyError, match="interrupted"):
        twin(torch.randn(5, WIDTH))
    assert no_hooks_left()
    fail[0] = False
    assert_same_step(model, twin, torch.randn(5, WIDTH))


def test_early_exit_inside_a_segment():
    model, twin = twins(stop_after=1)  # segment 0..3 ends after its second block
    me.segment(twin.layers, plan=PLANS["three, two, keep"])
    assert_same_step(model, twin, torch.randn(5, WIDTH))
    assert no_hooks_left()


def test_random_numbers_drawn_between_blocks():
    """LayerDrop-like: the model draws from the RNG between blocks without changing the hidden
    state; each block replays the RNG state it started with."""
    model, twin = twins(between=lambda index, hidden: hidden if torch.rand(()) >= 0 else None)
    me.segment(twin.layers, plan=PLANS["one segment"])
    assert_same_step(model, twin, torch.randn(5, WIDTH))


def test_no_grad_forward_runs_plainly():
    model, twin = twins()
    me.segment(twin.layers, plan=PLANS["three, two, keep"])
    x = torch.randn(5, WIDTH)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(x)
        torch.manual_seed(0)
        assert torch.equal(twin(x), expected)


def test_inside_an_outer_checkpoint():
    model, twin = twins()
    me.segment(twin.layers, plan=PLANS["three, two, keep"])
    x = torch.randn(5, WIDTH)
    expected_loss, expected_grads = step(model, x)
    torch.manual_seed(0)
    loss = me.checkpoint(twin, x, use_reentrant=False).square().mean()
    loss.backward()
    assert torch.equal(loss, expected_loss)
    for a, p in zip(expected_grads, twin.parameters(), strict=True):
        assert torch.equal(a, p.grad)
