"""Differential tests: memengine against plain PyTorch on generated models.

A seeded generator builds small random models from the parts memengine treats differently — fused
Linear and Hugging Face Conv1D layers, Embedding, LayerNorm, BatchNorm, tied weights, frozen and
unused parameters, per-layer keyword arguments — and each case takes gradients one of the ways
ordinary PyTorch code does (plain backward, autograd.grad on inputs, backward(inputs=), a retained
graph run twice, an exception mid-backward then a retry, torch.utils.checkpoint, me.checkpoint,
me.segment with multi-block segments, micro-batching through Engine, requires_grad toggled
between steps, deepcopy, autocast). The same case runs on a plain fp32 PyTorch copy of the model;
every gradient, and every parameter after optimizer steps, must agree.

Agreement is judged against an fp64 oracle: memengine's error may be at most twice PyTorch's own
error on the same inputs (with a floor of a few fp32 ulps of the gradient's scale, for the
gradients PyTorch happens to get exactly right), never a fixed tolerance.
"""

import copy
import dataclasses
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.plan import Segment

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # the generator then draws no Conv1D layers
    Conv1D = None

VOCAB, WIDTH, ROWS, LENGTH = 23, 12, 4, 5
MODES = (
    "backward",
    "autograd_grad_inputs",
    "backward_inputs",
    "retain_graph",
    "exception_then_retry",
    "torch_checkpoint",
    "me_checkpoint",
    "me_segment",
    "engine",
    "requires_grad_toggle",
    "deepcopy",
    "autocast",
    "bf16_multi_use",
    "weights_loaded_after_optimizer",
    "zero_token_steps",
    "shape_change_under_budget",
)
SEEDS_PER_MODE = 17  # 16 modes x 17 = 272 generated cases


class Unit(torch.nn.Module):
    """One layer of a generated model: x -> x + f(x) (or f(x)), optionally scaled by a per-layer
    keyword argument."""

    def __init__(self, kind, bias):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.f = torch.nn.Linear(WIDTH, WIDTH, bias=bias)
        elif kind == "conv1d":
            self.f = Conv1D(WIDTH, WIDTH)
        elif kind == "mlp":
            self.f = torch.nn.Sequential(
                torch.nn.Linear(WIDTH, 2 * WIDTH, bias=bias), torch.nn.GELU(), torch.nn.Linear(2 * WIDTH, WIDTH)
            )
        elif kind == "layernorm":
            self.f = torch.nn.LayerNorm(WIDTH)
        elif kind == "batchnorm":
            self.f = torch.nn.BatchNorm1d(WIDTH)
        else:
            raise ValueError(kind)

    def forward(self, x, scale=1.0):
        if self.kind == "batchnorm":
            return x + scale * self.f(x.transpose(1, 2)).transpose(1, 2)
        return x + scale * self.f(x)


@dataclasses.dataclass
class Spec:
    kinds: list
    biases: list
    tied: bool
    frozen: list  # indices of units whose parameters do not require grad
    unused: bool
    scales: list  # per-layer keyword argument


def draw_spec(rng):
    kinds = ["linear", "mlp", "layernorm", "batchnorm"] + (["conv1d"] if Conv1D is not None else [])
    count = rng.randint(2, 4)
    units = [rng.choice(kinds) for _ in range(count)]
    units[0] = rng.choice(["linear", "mlp"] + (["conv1d"] if Conv1D is not None else []))  # one fused layer at least
    return Spec(
        kinds=units,
        biases=[rng.random() < 0.7 for _ in units],
        tied=rng.random() < 0.5,
        frozen=[i for i in range(1, count) if rng.random() < 0.25],
        unused=rng.random() < 0.5,
        scales=[round(rng.uniform(0.5, 1.5), 3) for _ in units],
    )


class Model(torch.nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.layers = torch.nn.ModuleList(Unit(k, b) for k, b in zip(spec.kinds, spec.biases, strict=True))
        self.head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
        if spec.tied:
            self.head.weight = self.embed.weight
        if spec.unused:
            self.unused = torch.nn.Parameter(torch.randn(3))
        for i in spec.frozen:
            self.layers[i].requires_grad_(False)
        self.scales = spec.scales

    def forward(self, tokens, noise=None, layer_runner=None, hook=None):
        x = self.embed(tokens)
        if noise is not None:
            x = x + noise
        for i, layer in enumerate(self.layers):
            if layer_runner is None:
                x = layer(x, scale=self.scales[i])
            else:
                x = layer_runner(layer, x, self.scales[i])
            if hook is not None and i == 0:
                x.register_hook(hook)
        return self.head(x)


def loss_sum(model, tokens, **kwargs):
    logits = model(tokens[:, :-1], **kwargs)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


def make_case(mode, seed):
    rng = random.Random(f"{mode}-{seed}")
    spec = draw_spec(rng)
    torch.manual_seed(seed)
    reference = Model(spec)
    oracle = copy.deepcopy(reference).double()
    model = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (ROWS, LENGTH + 1), generator=generator)
    noise = torch.randn(ROWS, LENGTH, WIDTH, generator=generator) * 0.1
    return spec, reference, oracle, model, tokens, noise


def gradients_of(model, buffer=None):
    """{name: gradient or None}: main_grad for parameters memengine covers (None when this window gave
    them nothing), .grad otherwise."""
    result = {}
    for name, p in model.named_parameters():
        if buffer is not None and getattr(p, "main_grad", None) is not None:
            result[name] = p.main_grad.clone() if buffer.received_gradient(p) else None
        else:
            result[name] = None if p.grad is None else p.grad.detach().clone()
    return result


def assert_agree(name, ours, theirs, exact):
    """ours vs theirs (PyTorch fp32), both judged against exact (the fp64 oracle) when given."""
    if theirs is None or ours is None:
        zero = lambda t: t is None or not torch.any(t)  # noqa: E731 - a missing gradient reads as zeros
        assert zero(ours) and zero(theirs), (
            f"{name}: one side has no gradient (ours {ours is None}, torch {theirs is None})"
        )
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
    if exact is None:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
        return
    exact = exact.double()
    torch_error = (theirs.double() - exact).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1e-30)
    our_error = (ours.double() - exact).abs().max().item()
    assert our_error <= 2 * max(torch_error, floor), (
        f"{name}: memengine error {our_error:.3g} vs PyTorch's {torch_error:.3g} (floor {floor:.3g})"
    )


def assert_all_agree(ours, theirs, exact=None):
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_agree(name, ours[name], theirs[name], None if exact is None else exact[name])


def assert_parameters_agree(model, reference, oracle):
    ours = {n: p.detach() for n, p in model.named_parameters()}
    theirs = {n: p.detach() for n, p in reference.named_parameters()}
    exact = {n: p.detach() for n, p in oracle.named_parameters()}
    assert_all_agree(ours, theirs, exact)


def run_all(models, fn):
    """fn(model) on the memengine model, the plain fp32 model and the fp64 oracle."""
    return [fn(m) for m in models]


def sgd_step(models, lr=0.1):
    for m in models:
        with torch.no_grad():
            for p in m.parameters():
                grad = p.grad
                if grad is not None:
                    p.sub_(lr * grad.to(p.dtype))


# -- the modes -------------------------------------------------------------------------------------
def mode_backward(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    for m in (model, reference, oracle):
        loss_sum(m, tokens).backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
    sgd_step((model, reference, oracle))  # fp32 parameters read main_grad through .grad
    assert_parameters_agree(model, reference, oracle)


def mode_autograd_grad_inputs(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    for m in (model, reference, oracle):
        loss_sum(m, tokens).backward()
    before = buffer.data.clone()
    results = []
    for m in (model, reference, oracle):
        x = noise.to(next(m.parameters()).dtype).requires_grad_()
        (grad,) = torch.autograd.grad(loss_sum(m, tokens, noise=x), [x])
        results.append(grad)
    assert_agree("d loss / d noise", *results)
    assert torch.equal(buffer.data, before), "autograd.grad on an input changed the gradient buffer"
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))


def mode_backward_inputs(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    results = []
    for m in (model, reference, oracle):
        x = noise.to(next(m.parameters()).dtype).requires_grad_()
        loss_sum(m, tokens, noise=x).backward(inputs=[x])
        results.append(x.grad)
    assert_agree("noise.grad", *results)
    assert not torch.any(buffer.data), "backward(inputs=[x]) wrote parameter gradients"
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))


def mode_retain_graph(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    for m in (model, reference, oracle):
        loss = loss_sum(m, tokens)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))


class SimulatedOutOfMemory(RuntimeError):
    pass


def mode_exception_then_retry(spec, reference, oracle, model, tokens, noise):
    """An exception in the middle of backward (the first layer's output gradient), caught; the loop
    clears the gradients and retries; then an optimizer step."""
    buffer = me.patch(model)
    buffer.zero_()

    def fail(_):
        raise SimulatedOutOfMemory("simulated out of memory")

    for m in (model, reference, oracle):
        with pytest.raises(SimulatedOutOfMemory):
            loss_sum(m, tokens, hook=fail).backward()
    buffer.start_window()
    reference.zero_grad()
    oracle.zero_grad()
    for m in (model, reference, oracle):
        loss_sum(m, tokens).backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
    fp32 = [p for p in model.parameters() if p.requires_grad and buffer.received_gradient(p)]
    assert all(p.grad is not None for p in fp32), "fp32 parameters lost .grad after a failed backward"
    sgd_step((model, reference, oracle))
    assert_parameters_agree(model, reference, oracle)


def _checkpointed(checkpoint_fn):
    def runner(layer, x, scale):
        return checkpoint_fn(layer, x, use_reentrant=False, scale=scale)

    return runner


def mode_torch_checkpoint(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    runner = _checkpointed(torch.utils.checkpoint.checkpoint)
    for m in (model, reference, oracle):
        loss_sum(m, tokens, layer_runner=runner).backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
    assert_buffers_agree(model, reference)


def mode_me_checkpoint(spec, reference, oracle, model, tokens, noise):
    buffer = me.patch(model)
    buffer.zero_()
    loss_sum(model, tokens, layer_runner=_checkpointed(me.checkpoint)).backward()
    for m in (reference, oracle):
        loss_sum(m, tokens).backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
    assert_buffers_agree(model, reference)


def mode_me_segment(spec, reference, oracle, model, tokens, noise):
    """A multi-block recompute segment over the layers, each called with its own scale."""
    buffer = me.patch(model)
    buffer.zero_()
    count = len(model.layers)
    plan = [Segment(0, count - 1, "recompute"), Segment(count - 1, count, "keep")]
    handle = me.segment(model.layers, plan=plan)
    try:
        for m in (model, reference, oracle):
            loss_sum(m, tokens).backward()
    finally:
        handle.remove()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
    assert_buffers_agree(model, reference)


def mode_engine(spec, reference, oracle, model, tokens, noise):
    """Two Engine steps over micro-batches of different sizes (3 rows, then 1) against PyTorch
    accumulating the same micro-batches' summed losses divided by the step's token count, then SGD."""
    lr = 0.05
    engine = me.Engine(model, optimizer=lambda params: torch.optim.SGD(params, lr=lr), micro_batch_size=3)
    for _ in range(2):
        engine.step(tokens, lambda m, mb: (loss_sum(m, mb), mb[:, 1:].numel()))
        for m in (reference, oracle):
            m.zero_grad()
            for micro_batch in tokens.split(3):
                (loss_sum(m, micro_batch) / tokens[:, 1:].numel()).backward()
        sgd_step((reference, oracle), lr=lr)
    assert_parameters_agree(model, reference, oracle)


def mode_requires_grad_toggle(spec, reference, oracle, model, tokens, noise):
    """A covered layer frozen for one step, then trained again."""
    buffer = me.patch(model)
    index = 0
    for step in range(3):
        frozen = step == 1
        for m in (model, reference, oracle):
            m.layers[index].requires_grad_(not frozen)
            m.zero_grad()
        buffer.start_window()
        for m in (model, reference, oracle):
            loss_sum(m, tokens).backward()
        assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))
        sgd_step((model, reference, oracle))
        assert_parameters_agree(model, reference, oracle)


def mode_deepcopy(spec, reference, oracle, model, tokens, noise):
    """A copy of a patched model, patched on its own, trains like a copy of the plain model."""
    me.patch(model)
    loss_sum(model, tokens).backward()
    before = me.patch(model).data.clone()
    twin = copy.deepcopy(model)
    buffer = me.patch(twin)
    for p in twin.parameters():
        if p.requires_grad:  # the copy is really covered by its own buffer
            assert p.main_grad.untyped_storage().data_ptr() == buffer.data.untyped_storage().data_ptr()
    buffer.zero_()
    reference.zero_grad()
    for m in (twin, reference, oracle):
        loss_sum(m, tokens).backward()
    assert_all_agree(gradients_of(twin, buffer), gradients_of(reference), gradients_of(oracle))
    assert all(
        getattr(a, "main_grad", None) is None or a.main_grad.data_ptr() != b.main_grad.data_ptr()
        for a, b in zip(twin.parameters(), model.parameters(), strict=True)
    ), "the copy shares gradient memory with the original"
    assert torch.equal(me.patch(model).data, before), "training the copy changed the original's gradients"


def mode_autocast(spec, reference, oracle, model, tokens, noise):
    """bf16 autocast on both sides: memengine's fp32 weight gradients are at least as accurate as
    PyTorch's (judged against the fp64 oracle of the same model without autocast)."""
    buffer = me.patch(model)
    buffer.zero_()
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_sum(m, tokens).backward()
    loss_sum(oracle, tokens).backward()
    assert_all_agree(gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle))


def mode_bf16_multi_use(spec, reference, oracle, model, tokens, noise):
    """A bf16 model run twice in one backward (every parameter used at least twice, tied ones more): memengine
    against plain PyTorch summing each parameter's contributions in fp32 (grad_dtype), judged against the fp64
    oracle of the same bf16 weights."""
    model, reference = model.bfloat16(), reference.bfloat16()
    oracle = copy.deepcopy(reference).double()
    for p in reference.parameters():
        p.grad_dtype = torch.float32
    buffer = me.patch(model)
    buffer.zero_()
    for m in (model, reference, oracle):
        (loss_sum(m, tokens) + loss_sum(m, tokens.flip(0))).backward()
    ours, theirs, exact = gradients_of(model, buffer), gradients_of(reference), gradients_of(oracle)
    fused = {id(p) for module in model.modules() if me.nn.is_fused(module) for p in module.parameters(recurse=False)}
    for name, p in model.named_parameters():
        if id(p) not in fused:
            # Gradients autograd produces: the same bf16 per-use gradients, summed in fp32 on both sides.
            assert_agree(name, ours[name], theirs[name], None)
        elif ours[name] is not None:
            # Fused layers sum in fp32 what PyTorch's bf16 GEMM rounds to bf16 per use: judged by the relative
            # L2 error against the oracle (an element's max error is dominated by the bf16 forward's noise,
            # which one bf16 rounding more or less can cancel by chance).
            ours_error, torch_error = (
                relative_l2_error(gradient, exact[name]) for gradient in (ours[name], theirs[name])
            )
            assert ours_error <= 2 * torch_error, (name, ours_error, torch_error)


def relative_l2_error(gradient, exact):
    return ((gradient.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def engine_steps_against_pytorch(engine, reference, oracle, batches, lr):
    """engine.step over `batches` (micro-batches of 3 rows), and the same steps in plain PyTorch: the summed loss
    of each micro-batch over the step's token count, then SGD."""
    for batch in batches:
        engine.step(batch, lambda m, mb: (loss_sum(m, mb), mb[:, 1:].numel()))
        for m in (reference, oracle):
            m.zero_grad()
            for micro_batch in batch.split(3):
                (loss_sum(m, micro_batch) / batch[:, 1:].numel()).backward()
        sgd_step((reference, oracle), lr=lr)


def mode_weights_loaded_after_optimizer(spec, reference, oracle, model, tokens, noise):
    """Load other weights into the model after the Engine (and its masters) exist, as many scripts do: the next
    steps train from the loaded weights, as plain PyTorch does."""
    lr = 0.05
    engine = me.Engine(model, optimizer=lambda params: torch.optim.SGD(params, lr=lr), micro_batch_size=3)
    torch.manual_seed(1000)
    loaded = Model(spec).state_dict()
    for m in (model, reference, oracle):
        m.load_state_dict(loaded)
    engine_steps_against_pytorch(engine, reference, oracle, [tokens, tokens.flip(0)], lr)
    assert_parameters_agree(model, reference, oracle)


def mode_zero_token_steps(spec, reference, oracle, model, tokens, noise):
    """A micro-batch with no tokens inside a step, then a step with none at all (refused, leaving nothing behind),
    then an ordinary step: as plain PyTorch doing only the steps that had tokens."""
    lr = 0.05
    engine = me.Engine(model, optimizer=lambda params: torch.optim.SGD(params, lr=lr), micro_batch_size=3)

    def masked_loss(m, micro_batch, counted):
        return loss_sum(m, micro_batch) * 0.0 if not counted else loss_sum(m, micro_batch)

    # Step 1: rows 0-2 carry no tokens (their loss is multiplied by 0, their count is 0).
    rows = tokens.shape[0]
    engine.step(
        tokens, lambda m, mb: (masked_loss(m, mb, mb.shape[0] < 3), 0 if mb.shape[0] == 3 else mb[:, 1:].numel())
    )
    for m in (reference, oracle):
        m.zero_grad()
        (loss_sum(m, tokens[3:]) / tokens[3:, 1:].numel()).backward()
    sgd_step((reference, oracle), lr=lr)
    with pytest.raises(ValueError, match="token counts sum to 0"):
        engine.step(tokens, lambda m, mb: (loss_sum(m, mb) * 0.0, 0))
    assert rows > 3 and torch.isfinite(engine.buffer.data).all()
    engine_steps_against_pytorch(engine, reference, oracle, [tokens.flip(0)], lr)
    assert_parameters_agree(model, reference, oracle)


def mode_shape_change_under_budget(spec, reference, oracle, model, tokens, noise):
    """Engine(budget=) between its smallest feasible budget and its no-recompute peak, over a short batch and then
    a longer one (planned again) and the short one again: recomputation changes memory, never the numbers."""
    lr = 0.05
    short = tokens[:, : LENGTH // 2 + 1]

    def counted(m, mb):
        return loss_sum(m, mb), mb[:, 1:].numel()

    probe = me.Engine(copy.deepcopy(reference), optimizer=torch.optim.SGD, micro_batch_size=3)
    report = probe.memory_report(tokens, counted)
    budget = (report.smallest_feasible_budget + report.no_recompute_peak) // 2
    engine = me.Engine(
        model, optimizer=lambda params: torch.optim.SGD(params, lr=lr), micro_batch_size=3, budget=budget
    )
    for batch in (short, tokens, short):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a budget above a batch's no-recompute peak says so
            engine_steps_against_pytorch(engine, reference, oracle, [batch], lr)
        assert_parameters_agree(model, reference, oracle)
        # Each step from the same parameters: with BatchNorm over a few rows, fp32 rounding differences of
        # earlier steps grow faster than the oracle's own error (measured: 12x after three steps).
        with torch.no_grad():
            for m in (reference, oracle):
                for target, source in zip(
                    [*m.parameters(), *m.buffers()], [*model.parameters(), *model.buffers()], strict=True
                ):
                    target.copy_(source)


def assert_buffers_agree(model, reference):
    for (name, ours), theirs in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=f"buffer {name}")


CASES = [pytest.param(mode, seed, id=f"{mode}-{seed}") for mode in MODES for seed in range(SEEDS_PER_MODE)]


@pytest.mark.parametrize("mode, seed", CASES)
def test_memengine_matches_pytorch(mode, seed):
    globals()[f"mode_{mode}"](*make_case(mode, seed))
