"""memengine.patch and copies of a patched model: copy.deepcopy gives an unpatched copy (its fused
layers run as plain torch layers) that memengine.patch and memengine.Engine patch afresh, whose
gradients equal plain PyTorch's, and which never touches the original's buffer."""

import copy
import functools

import torch
import torch.nn.functional as F

import memengine as me


class Model(torch.nn.Module):
    def __init__(self, vocab=24, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.down(F.gelu(self.up(h)))
        return self.out(self.norm(h))


def loss_sum(model, tokens):
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="sum"), tokens.numel()


def tokens(seed=0):
    return torch.randint(0, 24, (4, 6), generator=torch.Generator().manual_seed(seed))


def test_deepcopy_of_a_patched_model_is_patched_afresh():
    torch.manual_seed(0)
    reference = Model()
    model = copy.deepcopy(reference)
    buffer = me.patch(model)
    loss_sum(model, tokens(1))[0].backward()
    original_gradients = buffer.data.clone()

    duplicate = copy.deepcopy(model)
    assert all(getattr(p, "main_grad", None) is None for p in duplicate.parameters())
    duplicate_buffer = me.patch(duplicate)
    assert duplicate_buffer is not buffer
    assert all(
        p.main_grad.data_ptr() != q.main_grad.data_ptr()
        for p, q in zip(duplicate.parameters(), model.parameters(), strict=True)
    )
    duplicate_buffer.start_window()
    loss_sum(duplicate, tokens(2))[0].backward()
    loss_sum(reference, tokens(2))[0].backward()
    for (name, p), q in zip(duplicate.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(buffer.data, original_gradients), "the copy's backward reached the original's buffer"


def test_engine_on_a_deepcopy_of_a_patched_model_steps_like_a_fresh_model():
    torch.manual_seed(0)
    fresh = Model()
    patched = copy.deepcopy(fresh)
    me.patch(patched)
    duplicate = copy.deepcopy(patched)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    engines = [me.Engine(m, optimizer=optimizer, micro_batch_size=2) for m in (fresh, duplicate)]
    for step in range(2):
        for engine in engines:
            engine.step(tokens(step), loss_sum)
    for (name, p), q in zip(duplicate.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_deepcopy_of_a_model_with_a_direct_grad_buffer_is_unpatched():
    model = Model()
    buffer = me.GradBuffer(model)
    duplicate = copy.deepcopy(model)
    loss_sum(duplicate, tokens())[0].backward()  # the copied forward pre-hook does nothing on the copy
    assert all(p.grad is not None for p in duplicate.parameters())
    assert not any(buffer.received_gradient(p) for p in model.parameters())


def test_a_patched_model_runs_forward_and_backward_on_the_meta_device():
    """Shapes without memory (predictions of models too large to build): the fused layers and the fused loss run
    on the meta device, where autocast does not exist and every tensor has the data pointer 0 (so memory
    overlap checks, which would all report an overlap, are skipped)."""
    from memengine.models import GPT

    with torch.device("meta"):
        model = GPT(vocab=64, width=32, layers=2, heads=4, length=16)
    buffer = me.patch(model)
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    loss, _ = me.linear_cross_entropy(model.hidden_states(tokens), model.head.weight, tokens)
    loss.backward()
    assert loss.is_meta and buffer.data.is_meta
    assert all(buffer.received_gradient(p) for p in buffer.params)
