"""A patched model driven by a plain training loop (Hugging Face Trainer, accelerate, hand-written
code): whatever the loop calls, memengine either does what plain PyTorch would or raises.

- A torch.optim optimizer that is not memengine.MasterOptimizer, about to step bf16/fp16
  parameters whose gradients live in the fp32 GradBuffer, raises naming the fix (no silent
  no-op, no lossy low-precision update).
- model.zero_grad() opens a new accumulation window for every parameter, fp32 or not.
- torch.nn.utils.clip_grad_norm_ sees the buffer's gradients (never 0.0) and clips them in place.
- Optimizers holding no patched low-precision parameter are untouched and not scanned per step.
"""

import copy
import time

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.grad import hooks

LOW_PRECISION = [torch.bfloat16, torch.float16]
VOCAB = 11


class Net(torch.nn.Module):
    """Fused layers (Linear), hook-folded ones (Embedding, LayerNorm) and a branch used on some steps only."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.hidden = torch.nn.Linear(8, 16)
        self.sometimes = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(16, VOCAB)

    def forward(self, tokens, use_sometimes):
        h = self.norm(self.embed(tokens))
        if use_sometimes:
            h = h + self.sometimes(h)
        return self.out(torch.tanh(self.hidden(h)))


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def backward(model, step, use_sometimes=False):
    tokens = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(100 + step))
    logits = model(tokens[:, :-1], use_sometimes)
    F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()


GRADIENT_RECEIVERS = 7  # every parameter but sometimes.weight and sometimes.bias, when it is unused


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_plain_optimizer_over_low_precision_patched_model_raises(dtype, optimizer_cls):
    model = make_model(dtype)
    me.patch(model)
    optimizer = optimizer_cls(model.parameters(), lr=1e-2)  # as Trainer builds its default optimizer
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 0)
    with pytest.raises(RuntimeError, match="memengine.MasterOptimizer") as raised:
        optimizer.step()
    message = str(raised.value)
    assert f"{GRADIENT_RECEIVERS} {str(dtype).removeprefix('torch.')} parameter" in message
    assert optimizer_cls.__name__ in message and "memengine.Engine" in message and "fp32" in message
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_optimizer_built_before_patch_or_extended_after_it_raises(dtype):
    model = make_model(dtype)
    optimizer = torch.optim.AdamW([model.embed.weight], lr=1e-2)
    backward(model, 0)
    optimizer.step()  # unpatched: plain low-precision training, as PyTorch does it
    model.zero_grad()
    me.patch(model)
    backward(model, 1)
    with pytest.raises(RuntimeError, match="1 .* parameter"):
        optimizer.step()
    optimizer.add_param_group({"params": [model.norm.weight, model.norm.bias]})
    with pytest.raises(RuntimeError, match="3 .* parameter"):
        optimizer.step()


def trainer_like_loop(model, optimizer, zero_grad, steps=4):
    """backward, clip, step, zero the gradients, as Trainer does; the sometimes-branch runs on even steps."""
    norms = []
    for step in range(steps):
        backward(model, step, use_sometimes=step % 2 == 0)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        optimizer.step()
        zero_grad()
    return norms


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_model_zero_grad_opens_a_new_window_for_every_parameter(dtype):
    # Reference: MasterOptimizer.zero_grad(), which opens the buffer's window (as Engine does).
    reference = make_model(dtype)
    reference_optimizer = me.MasterOptimizer(torch.optim.AdamW, me.patch(reference), lr=1e-2)
    reference_norms = trainer_like_loop(reference, reference_optimizer, reference_optimizer.zero_grad)
    model = make_model(dtype)
    optimizer = me.MasterOptimizer(torch.optim.AdamW, me.patch(model), lr=1e-2)
    norms = trainer_like_loop(model, optimizer, model.zero_grad)
    # Same arithmetic: bit for bit. Gradients accumulated across steps, or the unused branch stepped
    # with its previous step's gradient, would show here.
    assert torch.equal(torch.stack(norms), torch.stack(reference_norms))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_clip_grad_norm_over_patched_model_returns_the_buffer_norm_and_clips_it(dtype):
    model = make_model(dtype)
    buffer = me.patch(model)
    for step in range(2):  # two micro-batches accumulate into the buffer
        backward(model, step)
    buffer.finish_window()  # zeroes the unused branch's slices: the buffer holds this window's gradients
    unclipped = buffer.data.clone()
    true_norm = unclipped.double().norm()
    max_norm = 0.25 * true_norm.item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # fp32 norms of a few hundred values, summed in a different order than the fp64 oracle.
    torch.testing.assert_close(norm.double(), true_norm, rtol=1e-6, atol=0)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s own formula
    assert torch.equal(buffer.data, unclipped * coefficient)


def test_optimizers_without_patched_low_precision_parameters_step_unchanged_and_unscanned():
    patched = make_model(torch.bfloat16)
    me.patch(patched)  # a live low-precision buffer in the process: the hook cannot return at once
    plain = make_model(torch.float32)
    plain.extra = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(3)) for _ in range(91))  # 100 parameters
    reference = copy.deepcopy(plain)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)

    class CountingList(list):
        iterations = 0

        def __iter__(self):
            CountingList.iterations += 1
            return super().__iter__()

    optimizer.param_groups[0]["params"] = CountingList(optimizer.param_groups[0]["params"])
    hooks.refuse_low_precision_step(optimizer, (), {})  # first sight: one scan
    scans = CountingList.iterations
    started = time.perf_counter()
    for _ in range(10_000):
        hooks.refuse_low_precision_step(optimizer, (), {})
    elapsed = time.perf_counter() - started
    assert CountingList.iterations == scans, "the hook walked an unrelated optimizer's parameters again"
    print(f"10k hook calls on an optimizer of 100 unpatched parameters: {elapsed * 1e3:.1f} ms")
    for model, opt in [(plain, optimizer), (reference, reference_optimizer)]:
        backward(model, 0)
        opt.step()
    for p, q in zip(plain.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_plain_optimizer_over_fp32_patched_model_still_steps():
    model = make_model(torch.float32)
    me.patch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, 0)
    optimizer.step()
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)]
    assert sum(changed) == GRADIENT_RECEIVERS


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_release_and_deepcopy_leave_plain_low_precision_parameters(dtype):
    model = make_model(dtype)
    buffer = me.patch(model)
    backward(model, 0)
    twin = copy.deepcopy(model)
    buffer.release()
    for copy_or_original in (twin, model):
        assert all(p.grad is None and p.grad_dtype == dtype for p in copy_or_original.parameters())
        optimizer = torch.optim.AdamW(copy_or_original.parameters(), lr=1e-2)
        backward(copy_or_original, 1)
        optimizer.step()  # plain low-precision training, no memengine in the way
        assert all(p.grad is None or p.grad.dtype == dtype for p in copy_or_original.parameters())
