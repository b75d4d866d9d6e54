"""memengine.nn.Embedding (what memengine.patch makes of a torch.nn.Embedding): its weight gradient goes
straight into the fp32 buffer, each token's row added in fp32 (embedding_grad_accumulate_), against plain
PyTorch and an fp64 oracle: padding_idx, repeated tokens, tied weights, two micro-batches, the paths autograd
takes, and the embeddings patch leaves alone (max_norm, scale_grad_by_freq, sparse)."""

import copy

import pytest
import torch

import memengine as me
from memengine.ops.embedding_grad import embedding_grad_accumulate_


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
def test_fused_embedding_gradient_against_pytorch_and_fp64(dtype, padding_idx):
    torch.manual_seed(0)
    model = torch.nn.Embedding(40, 8, padding_idx=padding_idx).to(dtype)
    plain, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    plain.weight.grad_dtype = torch.float32 if dtype != torch.float32 else None
    buffer = me.patch(model)
    assert isinstance(model, me.nn.Embedding)
    buffer.zero_()
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):  # the first micro-batch overwrites, the second adds
        tokens = torch.randint(0, 6, (300,), generator=generator)  # few rows: many repeats
        tokens[::7] = 39  # and the last row (padding_idx -1)
        weights = torch.randn(300, 8, generator=generator).to(dtype)
        for m, w in ((model, weights), (plain, weights), (oracle, weights.double())):
            (m(tokens) * w).sum().backward()
    ours, theirs, exact = model.weight.main_grad, plain.weight.grad, oracle.weight.grad
    assert relative(ours, exact) <= max(2 * relative(theirs, exact), 1e-6)
    if padding_idx is not None:
        assert not ours[padding_idx].any()


def test_tied_with_a_linear_head_both_contributions_reach_one_main_grad():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(30, 8)
            self.head = torch.nn.Linear(8, 30, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens)))

    torch.manual_seed(0)
    model = Tied()
    reference = copy.deepcopy(model)
    buffer = me.patch(model)
    tokens = torch.randint(0, 30, (4, 9))
    model(tokens).square().sum().backward()
    reference(tokens).square().sum().backward()
    assert buffer.received_gradient(model.embed.weight)
    torch.testing.assert_close(model.embed.weight.main_grad, reference.embed.weight.grad, rtol=1e-5, atol=1e-6)


def test_autograd_grad_returns_the_gradient_and_leaves_the_buffer_alone():
    torch.manual_seed(0)
    model = torch.nn.Embedding(20, 4)
    reference = copy.deepcopy(model)
    buffer = me.patch(model)
    buffer.zero_()
    tokens = torch.randint(0, 20, (15,))
    (ours,) = torch.autograd.grad(model(tokens).sum() * 2, [model.weight])
    (theirs,) = torch.autograd.grad(reference(tokens).sum() * 2, [reference.weight])
    torch.testing.assert_close(ours, theirs)
    assert not buffer.received_gradient(model.weight)


@pytest.mark.parametrize("options", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}], ids=["max_norm", "freq"])
def test_embeddings_with_other_semantics_are_left_as_torch_embeddings(options):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, **options))
    me.patch(model)
    assert type(model[0]) is torch.nn.Embedding


def test_bad_inputs_are_refused():
    main_grad = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="float32"):
        embedding_grad_accumulate_(main_grad.double(), torch.tensor([0]), torch.ones(1, 3))
    with pytest.raises(TypeError, match="int64 or int32"):
        embedding_grad_accumulate_(main_grad, torch.tensor([0.0]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="grad_output of shape"):
        embedding_grad_accumulate_(main_grad, torch.tensor([0, 1]), torch.ones(1, 3))
    embedding_grad_accumulate_(main_grad, torch.zeros(0, dtype=torch.int64), torch.ones(0, 3))  # empty: nothing
    assert not main_grad.any()
