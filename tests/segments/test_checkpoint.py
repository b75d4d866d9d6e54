"""me.checkpoint: bit-identical to no checkpointing (fp32, CPU, dropout included), for every
calling convention torch's non-reentrant checkpoint supports, plus what torch does not do."""

import importlib

import pytest
import torch
import torch.nn.functional as F

import memengine as me


class Block(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.BatchNorm1d(width)

    def forward(self, x, scale=1.0, extra=None):
        h = F.dropout(F.gelu(self.up(x)), p=0.3, training=self.training)
        y = self.norm(x + scale * self.down(h))
        if extra is not None:
            y = y + extra["shift"]
        return y, {"note": "not a tensor", "hidden": h.sum()}


def run(model, x, use_checkpoint, seed=0, **kwargs):
    torch.manual_seed(seed)
    if use_checkpoint:
        y, aux = me.checkpoint(model, x, **kwargs)
    else:
        y, aux = model(x, **kwargs)
    assert aux["note"] == "not a tensor"
    return (y.square().sum() + aux["hidden"]) * 0.5


def clone_model(model):
    twin = Block()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("mode", ["backward", "autograd.grad", "backward(inputs=)"])
def test_bit_identical_to_no_checkpoint(mode):
    torch.manual_seed(1)
    model = Block()
    twin = clone_model(model)
    x = torch.randn(8, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    kwargs = {"scale": 0.7, "extra": {"shift": torch.randn(16, requires_grad=True)}}
    shift2 = kwargs["extra"]["shift"].detach().clone().requires_grad_()
    losses, grads = [], []
    for m, inp, use, shift in ((model, x, False, kwargs["extra"]["shift"]), (twin, x2, True, shift2)):
        loss = run(m, inp, use, scale=0.7, extra={"shift": shift})
        params = list(m.parameters())
        if mode == "backward":
            loss.backward()
            grads.append([inp.grad, shift.grad] + [p.grad for p in params])
        elif mode == "autograd.grad":
            grads.append(list(torch.autograd.grad(loss, [inp, shift] + params)))
        else:
            loss.backward(inputs=[inp] + params[:2])
            grads.append([inp.grad] + [p.grad for p in params[:2]])
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    # BatchNorm statistics updated once, as without checkpointing (torch's checkpoint updates twice)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(twin.named_buffers())[name]), name


def test_frozen_input_nested_checkpoints_and_no_grad():
    torch.manual_seed(2)
    outer, inner = Block(), Block()
    outer_twin, inner_twin = clone_model(outer), clone_model(inner)
    x = torch.randn(8, 16)  # does not require grad: parameters must still get gradients

    def two_blocks(a, b, x, nested):
        h, _ = me.checkpoint(a, x) if nested else a(x)
        return b(h)

    torch.manual_seed(0)
    y, _ = two_blocks(outer, inner, x, False)
    y.sum().backward()
    torch.manual_seed(0)
    y2, _ = me.checkpoint(two_blocks, outer_twin, inner_twin, x, True)
    y2.sum().backward()
    assert torch.equal(y, y2)
    for p, q in zip(
        list(outer.parameters()) + list(inner.parameters()),
        list(outer_twin.parameters()) + list(inner_twin.parameters()),
        strict=True,
    ):
        assert q.grad is not None and torch.equal(p.grad, q.grad)
    with torch.no_grad():
        y3, _ = me.checkpoint(outer_twin, x)
    assert y3.grad_fn is None


def test_fused_accumulation_happens_once():
    torch.manual_seed(3)
    model, twin = Block().eval(), None
    twin = clone_model(model).eval()
    buffers = [me.patch(model), me.patch(twin)]
    for buffer in buffers:
        buffer.start_window()
    x = torch.randn(4, 16)
    for _ in range(2):  # two micro-batches into one window
        run(model, x, False).backward()
        run(twin, x, True).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.main_grad, q.main_grad)


def test_debug_mode_names_the_first_divergent_tensor():
    calls = {"n": 0}
    weight = torch.randn(5, 5, requires_grad=True)

    def unstable(x):
        calls["n"] += 1
        h = torch.tanh(x @ weight)
        return (h * calls["n"]).exp().sum()  # the second call (the recomputation) differs

    x = torch.randn(3, 5, requires_grad=True)
    loss = me.checkpoint(unstable, x, debug=True)
    with pytest.raises(me.CheckpointError, match=r"recomputed tensor \d+ \(saved by \w+\) differs"):
        loss.backward()
    calls["n"] = 0
    me.checkpoint(lambda x: torch.tanh(x @ weight).exp().sum(), x, debug=True).backward()  # stable: fine


class SquareReadingSavedTwice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        (again,) = ctx.saved_tensors  # a second read: the recomputed tensor was already handed over
        return grad * (x + again)


def test_retain_graph_and_saved_tensors_read_twice():
    torch.manual_seed(3)
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)

    def fn(x):
        return SquareReadingSavedTwice.apply(torch.tanh(x @ w)).sum()

    expected = torch.autograd.grad(fn(x), [x, w])
    loss = me.checkpoint(fn, x)
    first = torch.autograd.grad(loss, [x, w], retain_graph=True)
    second = torch.autograd.grad(loss, [x, w])  # a second backward recomputes again
    for a, b, c in zip(expected, first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_recomputed_tensors_are_freed_as_backward_uses_them():
    """Peak live bytes of a checkpointed chain's backward stay at those of the uncheckpointed one:
    each recomputed tensor is released once its node has run, not at the end of the segment."""
    from memengine.plan import LiveBytes

    torch.manual_seed(4)
    layers = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)) for _ in range(3)]
    )
    base = torch.randn(64, 32)
    peaks = []
    for use_checkpoint in (False, True):
        with LiveBytes() as live:
            x = base.clone().requires_grad_()
            h = layers[0](x)
            y = me.checkpoint(layers[1:], h) if use_checkpoint else layers[1:](h)
            forward = live.mark()
            y.sum().backward()
        peaks.append((forward, live.window_peak - forward))
    (keep_forward, keep_backward), (checkpoint_forward, checkpoint_backward) = peaks
    assert checkpoint_forward < keep_forward
    # backward: the recomputation adds nothing beyond what keeping everything had stored
    assert checkpoint_backward <= keep_backward + (keep_forward - checkpoint_forward)


@pytest.mark.parametrize("call", ["closure", "module without state updates"])
def test_state_protection_where_it_cannot_be_ruled_out_and_only_there(call, monkeypatch):
    checkpoint_module = importlib.import_module("memengine.segments.checkpoint")  # the attribute is the function
    protected = []
    original = checkpoint_module.NoStateUpdates

    def spy():
        protected.append(True)
        return original()

    monkeypatch.setattr(checkpoint_module, "NoStateUpdates", spy)
    torch.manual_seed(5)
    model = Block()
    if call == "module without state updates":
        model.eval()  # BatchNorm reads its statistics and writes nothing: no protection needed
    twin = clone_model(model).train(model.training)
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(0)
    model(x)[0].sum().backward()
    torch.manual_seed(0)
    fn = (lambda h: twin(h)) if call == "closure" else twin  # a closure hides its modules
    me.checkpoint(fn, x)[0].sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(twin.named_buffers())[name]), name
    assert protected == ([True] if call == "closure" else [])
