"""The vocabulary ends (memengine.linear_cross_entropy into a patched head, memengine.nn.Embedding) on the paths
ordinary PyTorch code takes, each against an unpatched copy computing the same loss from the logits: an exception
half way through backward and the retry, retain_graph and a second backward, deepcopy of a patched model, a
requires_grad toggle, autocast, and torch.compile. Whatever plain PyTorch leaves in .grad, main_grad holds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_backward_paths import FailOnce  # identity whose backward raises while armed

import memengine as me

VOCABULARY, WIDTH = 53, 16


class LanguageModel(torch.nn.Module):
    def __init__(self, tie):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCABULARY, WIDTH)
        self.up = torch.nn.Linear(WIDTH, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCABULARY, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def loss(self, tokens, labels, fused):
        hidden = FailOnce.apply(torch.tanh(self.up(self.embed(tokens))))
        if fused:  # small tiles: several per token row
            return me.linear_cross_entropy(hidden, self.head.weight, labels, chunk_bytes=4096)[0]
        return F.cross_entropy(self.head(hidden).float().flatten(0, -2), labels.flatten(), reduction="sum")


def pair(tie=True):
    torch.manual_seed(0)
    reference = LanguageModel(tie)
    model = copy.deepcopy(reference)
    buffer = me.patch(model)
    assert isinstance(model.embed, me.nn.Embedding)
    return reference, model, buffer


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCABULARY, (3, 9), generator=generator)
    labels = torch.randint(0, VOCABULARY, (3, 9), generator=generator)
    labels[:, ::4] = -100
    return tokens, labels


def backward_both(reference, model, seed, **backward):
    tokens, labels = batch(seed)
    reference.loss(tokens, labels, fused=False).backward(**backward)
    model.loss(tokens, labels, fused=True).backward(**backward)


def assert_same_gradients(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, f"{name}: plain PyTorch has no gradient, the patched model has one"
            continue
        assert p.grad is not None, f"{name}: plain PyTorch has a gradient, the patched model has none"
        # The fused loss sums its fp32 products in another order than F.linear: relative to the whole gradient.
        error = ((p.grad.double() - q.grad.double()).norm() / q.grad.double().norm()).item()
        assert error < 1e-5, f"{name}: relative difference {error:.3g}"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_an_exception_mid_backward_then_the_retry_match_pytorch(tie):
    reference, model, _ = pair(tie)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, model)]
    for step in range(3):
        for optimizer in optimizers:
            optimizer.zero_grad()
        FailOnce.armed = True
        try:
            for m in (reference, model):
                with pytest.raises(RuntimeError, match="simulated out of memory"):
                    tokens, labels = batch(step)
                    m.loss(tokens, labels, fused=m is model).backward()
        finally:
            FailOnce.armed = False
        # Untied: the head's gradient (produced before the raise) is in both, the embedding's in neither. Tied: plain
        # PyTorch has nothing (autograd sums a leaf's uses before it accumulates), memengine the head's part, which
        # went into main_grad as it was produced; the zero_grad before the retry clears it (docs/gradients-and-
        # engine.md: a fused layer's contribution is in the buffer from the moment it is computed).
        if tie:
            assert reference.embed.weight.grad is None
            assert model.embed.weight.grad is not None and model.embed.weight.grad.any()
        else:
            assert_same_gradients(model, reference)
        for optimizer in optimizers:
            optimizer.zero_grad()
        backward_both(reference, model, step)
        backward_both(reference, model, step + 10)  # a second micro-batch adds
        assert_same_gradients(model, reference)
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
                torch.testing.assert_close(p, q, msg=f"step {step}: {name}")
                p.copy_(q)  # the next step from the same weights: sums in another order must not compound


def test_retain_graph_and_a_second_backward_add_twice():
    reference, model, _ = pair()
    tokens, labels = batch(0)
    losses = [reference.loss(tokens, labels, fused=False), model.loss(tokens, labels, fused=True)]
    for loss in losses:
        loss.backward(retain_graph=True)
        loss.backward()
    assert_same_gradients(model, reference)


def test_a_deepcopy_of_a_patched_model_is_unpatched_and_patches_afresh():
    """docs/gradients-and-engine.md: copy.deepcopy of a patched model gives an unpatched copy that me.patch patches
    afresh. Both the copy patched anew and the original then train as plain PyTorch does, apart."""
    reference, model, _ = pair()
    twin = copy.deepcopy(model)
    assert getattr(twin.embed.weight, "main_grad", None) is None
    me.patch(twin)
    assert twin.embed.weight.main_grad.data_ptr() != model.embed.weight.main_grad.data_ptr()
    backward_both(reference, twin, 0)
    assert_same_gradients(twin, reference)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_a_frozen_vocabulary_weight_gets_no_gradient():
    reference, model, _ = pair(tie=False)
    for m in (reference, model):
        m.head.weight.requires_grad_(False)
        m.embed.weight.requires_grad_(False)
    backward_both(reference, model, 0)
    assert model.head.weight.grad is None and model.embed.weight.grad is None
    assert_same_gradients(model, reference)


def test_autocast_fused_loss_is_at_least_as_close_to_fp64_as_plain_autocast():
    """Under CPU bf16 autocast plain PyTorch rounds the head's logits to bf16; the fused loss multiplies the operands
    it is given (bf16 hidden states, the fp32 head) with fp32 sums, and is no further from the fp64 loss of the same
    hidden states; its gradients reach the buffer."""
    reference, model, _ = pair(tie=False)
    tokens, labels = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = torch.tanh(reference.up(reference.embed(tokens)))
        plain = F.cross_entropy(reference.head(hidden).float().flatten(0, 1), labels.flatten(), reduction="sum")
        fused = model.loss(tokens, labels, fused=True)
    assert hidden.dtype == torch.bfloat16
    exact = F.cross_entropy(
        F.linear(hidden.double(), reference.head.weight.double()).flatten(0, 1), labels.flatten(), reduction="sum"
    )
    assert abs(fused.double() - exact) <= abs(plain.double() - exact) + 1e-6 * abs(exact)
    fused.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_compile_of_the_fused_loss_matches_eager():
    _, model, buffer = pair()
    tokens, labels = batch(0)

    def loss_fn(tokens, labels):
        return model.loss(tokens, labels, fused=True)

    buffer.start_window()
    eager = loss_fn(tokens, labels)
    eager.backward()
    expected = [p.main_grad.clone() for p in buffer.params]
    buffer.start_window()
    compiled = torch.compile(loss_fn)(tokens, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, g in zip(buffer.params, expected, strict=True):
        torch.testing.assert_close(p.main_grad, g, rtol=1e-5, atol=1e-6)
