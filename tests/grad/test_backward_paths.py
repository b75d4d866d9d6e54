"""Backward passes other than a plain loss.backward() on a patched model, each against an unpatched
copy doing the same thing: a backward that raises half way (and is retried), torch.autograd.grad
and backward(inputs=...), double backward (create_graph=True), parameters unfrozen after patch, and
sparse embedding gradients. Whatever plain PyTorch leaves in .grad, main_grad holds; a path
memengine cannot follow raises an error that names it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import memengine as me


class FailOnce(torch.autograd.Function):
    """Identity whose backward raises while `armed` is set (an out-of-memory error half way through backward)."""

    armed = False

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if FailOnce.armed:
            raise RuntimeError("simulated out of memory")
        return grad


class Net(torch.nn.Module):
    """Tied embedding/output, fused layers on both sides of the failure point, a norm (a hooked,
    non-fused parameter) and an fp32 input path for torch.autograd.grad."""

    def __init__(self, vocab=20, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        h = FailOnce.apply(torch.tanh(self.up(x)))
        return self.out(self.norm(x + self.down(h)))


def pair(seed=0):
    torch.manual_seed(seed)
    reference = Net()
    model = copy.deepcopy(reference)
    return reference, model


def loss_of(model, h):
    return model(h).square().mean()


def inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 16, generator=generator, requires_grad=True)


def gradients(model):
    """What each parameter holds: main_grad where a GradBuffer covers it, else .grad."""
    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
        out[name] = None if g is None else g.clone()
    return out


def assert_same_gradients(model, reference):
    """.grad of every parameter as plain PyTorch has it (None included); fp32 parameters of a
    patched model expose main_grad there."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, f"{name}: plain PyTorch has no gradient, the patched model has one"
        else:
            assert p.grad is not None, f"{name}: plain PyTorch has a gradient, the patched model has none"
            # Same fp32 sums in a different order (the fused kernels): the test file's tolerance.
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


# -- an exception during backward ------------------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_in_place"])
def test_backward_that_raises_then_retries_matches_pytorch(set_to_none):
    reference, model = pair()
    buffer = me.patch(model)
    ready = []
    buffer.register_ready_hook(ready.append)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (reference, model)]
    for step in range(3):
        h = inputs(seed=step)
        for m, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad(set_to_none=set_to_none)
            FailOnce.armed = True
            try:
                with pytest.raises(RuntimeError, match="simulated out of memory"):
                    loss_of(m, h).backward()
            finally:
                FailOnce.armed = False
        # After the failure both hold the same partial gradients (those produced before the raise).
        assert_same_gradients(model, reference)
        for m, optimizer in zip((reference, model), optimizers, strict=True):
            optimizer.zero_grad(set_to_none=set_to_none)
            loss_of(m, h).backward()
        assert_same_gradients(model, reference)
        ready.clear()
        for m in (reference, model):
            loss_of(m, h).backward()  # a second micro-batch: ready hooks fire after the retry too
        assert len({id(p) for p in ready}) == len(buffer.params) == len(ready)
        assert_same_gradients(model, reference)
        for optimizer in optimizers:
            optimizer.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, msg=f"step {step}: {name}")


# -- torch.autograd.grad and backward(inputs=...) ----------------------------------------------------
def run_both(reference, model, action):
    """A full backward first (so the buffer and .grad hold something), then `action` on each model.
    Returns the two results and the patched model's gradients from before the action."""
    h = inputs()
    results = []
    for m in (reference, model):
        loss_of(m, h).backward()
        if m is model:
            before = gradients(model)
        results.append(action(m, h.detach().clone().requires_grad_()))
    return *results, before


@pytest.mark.parametrize("kind", ["autograd_grad", "backward_inputs"])
def test_gradient_with_respect_to_the_input_leaves_weights_alone(kind):
    reference, model = pair()
    me.patch(model)

    def action(m, h):
        loss = loss_of(m, h)
        if kind == "autograd_grad":
            return torch.autograd.grad(loss, [h])[0]
        loss.backward(inputs=[h])
        return h.grad

    expected, got, before = run_both(reference, model, action)
    torch.testing.assert_close(got, expected)
    assert_same_gradients(model, reference)
    for name, g in gradients(model).items():
        assert torch.equal(before[name], g), f"{name}: the buffer changed"


@pytest.mark.parametrize("parameter", ["up.weight", "up.bias", "out.weight"])
def test_autograd_grad_of_a_fused_weight_returns_it_and_leaves_main_grad_alone(parameter):
    reference, model = pair()
    me.patch(model)

    def action(m, h):
        return torch.autograd.grad(loss_of(m, h), [m.get_parameter(parameter)])[0]

    expected, got, before = run_both(reference, model, action)
    torch.testing.assert_close(got, expected)
    assert_same_gradients(model, reference)
    for name, g in gradients(model).items():
        assert torch.equal(before[name], g), f"{name}: the buffer changed"


@pytest.mark.parametrize("parameter", ["up.weight", "up.bias", "out.weight", "norm.weight"])
def test_backward_inputs_a_fused_weight_accumulates_only_that_weight(parameter):
    reference, model = pair()
    me.patch(model)

    def action(m, h):
        loss_of(m, h).backward(inputs=[m.get_parameter(parameter)])

    run_both(reference, model, action)
    assert_same_gradients(model, reference)


# -- double backward ---------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast_bf16"])
def test_gradient_penalty_on_the_input_matches_pytorch(autocast):
    """WGAN-GP style: the penalty's gradient with respect to the weights goes through grad_input = g @ W."""
    reference, model = pair()
    me.patch(model)
    h = inputs()
    for m in (reference, model):
        x = h.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(m, x)
        (grad_x,) = torch.autograd.grad(loss, [x], create_graph=True)
        (loss + grad_x.float().square().sum()).backward()
    if autocast:
        # Same bf16 operations in both; the kernels' summation order may differ: compare relative
        # to the size of the gradient, at a few bf16 roundings.
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            error = (p.grad - q.grad).norm() / q.grad.norm()
            assert error < 8 * torch.finfo(torch.bfloat16).eps, f"{name}: relative error {error:.3g}"
    else:
        assert_same_gradients(model, reference)


def test_gradient_penalty_on_a_fused_weight_matches_pytorch():
    reference, model = pair()
    me.patch(model)
    h = inputs()
    for m in (reference, model):
        loss = loss_of(m, h.detach().clone().requires_grad_())
        (grad_w,) = torch.autograd.grad(loss, [m.down.weight], create_graph=True)
        grad_w.square().sum().backward()
    assert_same_gradients(model, reference)


def test_backward_with_create_graph_into_the_buffer_raises():
    reference, model = pair()
    me.patch(model)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        loss_of(model, inputs()).backward(create_graph=True)


# -- parameters unfrozen after patch -------------------------------------------------------------------
@pytest.mark.parametrize("parameter", ["up.weight", "norm.weight"])
def test_parameter_unfrozen_after_patch_raises(parameter):
    _, model = pair()
    model.get_parameter(parameter).requires_grad_(False)
    buffer = me.patch(model)
    buffer.check_coverage()
    model.get_parameter(parameter).requires_grad_(True)
    with pytest.raises(RuntimeError, match=f"{parameter}.*not in the GradBuffer"):
        buffer.check_coverage()
    with pytest.raises(RuntimeError, match=f"{parameter}.*not in the GradBuffer"):
        loss_of(model, inputs()).backward()


def test_parameter_replaced_after_patch_raises():
    _, model = pair()
    buffer = me.patch(model)
    model.norm = torch.nn.LayerNorm(16)
    with pytest.raises(RuntimeError, match="norm.weight.*not in the GradBuffer"):
        buffer.check_coverage()


# -- sparse gradients ----------------------------------------------------------------------------------
def test_sparse_embedding_is_refused_at_patch_time():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"sparse=True"):
        me.patch(model)


def test_sparse_gradient_from_a_functional_embedding_names_the_parameter():
    weight = torch.nn.Parameter(torch.randn(10, 4))
    buffer = me.GradBuffer([weight])
    with pytest.raises(RuntimeError, match=r"sparse gradient.*sparse=True"):
        F.embedding(torch.tensor([1, 2]), weight, sparse=True).sum().backward()
    assert buffer.received_gradient(weight) is False
