"""memengine.linear_cross_entropy (the LM head and its loss, logits one bounded tile at a time) against PyTorch:
loss and gradients against an fp64 oracle (no further than PyTorch's own bf16/fp32 computation of the same math)
for ignore_index rows, label smoothing, soft-capping, a logit scale, a z-loss and a bias; the head's gradient
into a GradBuffer (overwrite then add, tied with an embedding: one fp32 main_grad gets both); the paths
autograd takes (autograd.grad, backward(inputs=)); odd and empty shapes, non-contiguous inputs, bad inputs;
and the memory bound (the allocator never holds the [tokens, vocabulary] logits)."""

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.segments.allocator_peak import peak_extra_bytes

OPTIONS = {
    "plain": {},
    "label smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "logit scale": {"logit_scale": 0.5},
    "z-loss": {"z_loss": 1e-3},
    "bias": {"bias": True},
}


def make(tokens=37, hidden=16, vocabulary=203, dtype=torch.float32, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator).to(dtype)
    w = (torch.randn(vocabulary, hidden, generator=generator) * 0.5).to(dtype)
    b = torch.randn(vocabulary, generator=generator).to(dtype) if bias else None
    labels = torch.randint(0, vocabulary, (tokens,), generator=generator)
    labels[::5] = -100
    return h, w, b, labels


def torch_loss(h, w, b, labels, label_smoothing=0.0, softcap=None, logit_scale=1.0, z_loss=0.0):
    """The same math in plain PyTorch: logits in the operands' dtype, cross-entropy in fp32 (as a model does)."""
    z = F.linear(h, w, b).float() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, labels, reduction="sum", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + z_loss * (torch.logsumexp(z, 1)[labels != -100] ** 2).sum()
    return loss


def fused_loss(h, w, b, labels, **options):
    return me.linear_cross_entropy(h, w, labels, b, **options)[0]


def gradients(fn, h, w, b, labels, dtype=None, **options):
    tensors = [t if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in (h, w, b)]
    loss = fn(*tensors, labels, **options)
    loss = loss[0] if isinstance(loss, tuple) else loss
    (loss * 0.7).backward()
    return loss.detach().double(), [None if t is None else t.grad.double() for t in tensors]


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_an_fp64_oracle_at_least_as_well_as_pytorch(name, dtype):
    options = dict(OPTIONS[name])
    h, w, b, labels = make(dtype=dtype, bias=options.pop("bias", False))
    exact_loss, exact = gradients(torch_loss, h, w, b, labels, dtype=torch.float64, **options)
    ours_loss, ours = gradients(fused_loss, h, w, b, labels, chunk_bytes=4096, **options)
    theirs_loss, theirs = gradients(torch_loss, h, w, b, labels, **options)
    assert relative(ours_loss, exact_loss) <= max(2 * relative(theirs_loss, exact_loss), 1e-6)
    for index, (mine, torch_gradient, oracle) in enumerate(zip(ours, theirs, exact, strict=True)):
        if oracle is not None:
            floor = 4 * torch.finfo(dtype).eps
            assert relative(mine, oracle) <= max(2 * relative(torch_gradient, oracle), floor), (name, index)


def test_the_count_and_the_mean_are_hugging_face_s():
    h, w, _, labels = make()
    loss, count = me.linear_cross_entropy(h, w, labels)
    assert count.dtype == torch.int64 and int(count) == int((labels != -100).sum())
    expected = F.cross_entropy(h @ w.t(), labels)  # mean over the counted tokens
    torch.testing.assert_close(loss / count, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tokens", [0, 1, 3])
def test_odd_and_empty_shapes(tokens):
    h, w, _, labels = make(tokens=tokens, vocabulary=7, hidden=5)
    h.requires_grad_()
    loss, count = me.linear_cross_entropy(h, w, labels, chunk_bytes=64)
    loss.backward()
    expected = torch_loss(h.detach(), w, None, labels) if tokens else torch.zeros(())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert h.grad.shape == h.shape and int(count) == int((labels != -100).sum())


def test_non_contiguous_and_batched_inputs():
    h, w, _, labels = make(tokens=24)
    batched = h.reshape(4, 6, -1).transpose(0, 1)  # [6, 4, H], non-contiguous
    loss, _ = me.linear_cross_entropy(batched, w.t().contiguous().t(), labels.reshape(4, 6).t())
    torch.testing.assert_close(
        loss, torch_loss(batched.reshape(-1, h.shape[1]), w, None, labels.reshape(4, 6).t().reshape(-1))
    )


def test_bad_inputs_are_refused_with_the_argument_named():
    h, w, _, labels = make()
    with pytest.raises(ValueError, match="hidden's last dimension"):
        me.linear_cross_entropy(h[:, :3], w, labels)
    with pytest.raises(ValueError, match="labels of shape"):
        me.linear_cross_entropy(h, w, labels[:3])
    with pytest.raises(TypeError, match="labels must be int64"):
        me.linear_cross_entropy(h, w, labels.float())
    with pytest.raises(ValueError, match="label_smoothing"):
        me.linear_cross_entropy(h, w, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        me.linear_cross_entropy(h, w, labels, softcap=0.0)
    with pytest.raises(ValueError, match="bias must be"):
        me.linear_cross_entropy(h, w, labels, torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_bytes"):
        me.linear_cross_entropy(h, w, labels, chunk_bytes=0)


class Head(torch.nn.Module):
    def __init__(self, vocabulary=203, hidden=16, tie=False, bias=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, hidden)
        self.head = torch.nn.Linear(hidden, vocabulary, bias=bias)
        if tie:
            self.head.weight = self.embed.weight

    def loss(self, tokens, labels, fused):
        hidden = torch.tanh(self.embed(tokens))
        if fused:
            return me.linear_cross_entropy(hidden, self.head.weight, labels, self.head.bias, chunk_bytes=2048)[0]
        return F.cross_entropy(self.head(hidden).float(), labels, reduction="sum")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_head_gradient_goes_into_the_buffer_once_per_micro_batch(tie, bias):
    torch.manual_seed(0)
    model, reference = Head(tie=tie, bias=bias), Head(tie=tie, bias=bias)
    reference.load_state_dict(model.state_dict())
    buffer = me.patch(model)
    buffer.zero_()
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # two micro-batches: the first contribution overwrites, the second adds
        tokens = torch.randint(0, 203, (29,), generator=generator)
        labels = torch.randint(0, 203, (29,), generator=generator)
        model.loss(tokens, labels, fused=True).backward()
        reference.loss(tokens, labels, fused=False).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert buffer.received_gradient(p)
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_autograd_grad_and_backward_inputs_leave_the_buffer_alone():
    torch.manual_seed(0)
    model = Head()
    buffer = me.patch(model)
    buffer.zero_()
    tokens, labels = torch.randint(0, 203, (11,)), torch.randint(0, 203, (11,))
    (weight_gradient,) = torch.autograd.grad(model.loss(tokens, labels, fused=True), [model.head.weight])
    (expected,) = torch.autograd.grad(model.loss(tokens, labels, fused=False), [model.head.weight])
    torch.testing.assert_close(weight_gradient, expected, rtol=1e-5, atol=1e-6)
    hidden = torch.tanh(model.embed(tokens)).detach().requires_grad_()
    me.linear_cross_entropy(hidden, model.head.weight, labels)[0].backward(inputs=[hidden])
    assert hidden.grad is not None
    assert not any(buffer.received_gradient(p) for p in buffer.params)


def test_the_logits_never_exist_whole():
    """vocab 32000, 512 tokens: plain PyTorch holds 62.5 MiB of fp32 logits (and more); the fused loss about
    its chunk (4 MiB here) plus the tokens' own gradient."""
    tokens, hidden, vocabulary = 512, 64, 32000
    h, w, _, labels = make(tokens=tokens, hidden=hidden, vocabulary=vocabulary, dtype=torch.bfloat16)
    h.requires_grad_()
    w = torch.nn.Parameter(w)
    buffer = me.GradBuffer([w])  # the head's gradient goes into its fp32 buffer, as in a patched model
    chunk = 4 * 2**20

    def fused():
        me.linear_cross_entropy(h, w, labels, chunk_bytes=chunk)[0].backward()

    def plain():
        torch_loss(h, w, None, labels).backward()

    fused_peak = peak_extra_bytes(fused, h.device)
    assert buffer.received_gradient(w)
    # The weight tile's fp32 copy and the logits tile (each about chunk / 2), the tokens' fp32 rows and gradient.
    assert fused_peak < 1.5 * chunk + 4 * tokens * hidden * 4, fused_peak
    assert peak_extra_bytes(plain, h.device) > tokens * vocabulary * 4


def test_a_label_outside_the_vocabulary_raises_instead_of_a_wrong_loss():
    """torch's cross_entropy raises on such a target; picking no logit would give lse - 0, a silently wrong loss.
    ignore_index itself may lie outside the vocabulary (-100) and is skipped."""
    h, w, _, labels = make()
    for bad in (203, -1, 10_000):
        wrong = labels.clone()
        wrong[3] = bad
        with pytest.raises(ValueError, match=f"label {bad} is outside the vocabulary"):
            me.linear_cross_entropy(h, w, wrong)
    shifted = labels.clone()
    shifted[shifted == -100] = 500  # another ignore_index, itself outside the vocabulary
    loss, count = me.linear_cross_entropy(h, w, shifted, ignore_index=500)
    torch.testing.assert_close(loss, me.linear_cross_entropy(h, w, labels)[0])
    assert int(count) == int((labels != -100).sum())
