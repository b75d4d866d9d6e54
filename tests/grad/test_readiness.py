"""grad.readiness.Readiness in one process: the first watched backward learns each parameter's contribution
count and signals nothing; later ones signal a parameter exactly when its gradient is complete in main_grad
(a tied weight with a fused and an autograd use, memengine.checkpoint, an unused parameter), and a
contribution beyond the learned count raises instead of letting a reduction start early."""

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.grad.readiness import Readiness


class Model(torch.nn.Module):
    """A fused Linear (up, down), autograd-only parameters (norm), an unused Linear, and an LM head (fused)
    tied to the embedding (autograd)."""

    def __init__(self, width=16, vocab=32, recompute=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.unused = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.recompute = recompute
        self.down_uses = 1

    def block(self, x):
        for _ in range(self.down_uses):
            x = x + self.down(F.gelu(self.up(x)))
        return x

    def forward(self, tokens):
        x = self.embed(tokens)
        x = me.checkpoint(self.block, x, use_reentrant=False) if self.recompute else self.block(x)
        return self.head(self.norm(x))


def backward(model, seed):
    tokens = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten(), reduction="sum").backward()


class Watched:
    """A patched model, an event log of contributions and ready signals (the log's hook is registered before
    the Readiness, so a signal is logged after the contribution that caused it), and main_grad at each signal."""

    def __init__(self, recompute=False):
        torch.manual_seed(0)
        self.model = Model(recompute=recompute)
        self.buffer = me.patch(self.model)
        self.events = []
        self.at_signal = {}
        self.buffer.register_contribution_hook(lambda p: self.events.append(("contribution", p)))
        self.readiness = Readiness(self.buffer, self._ready)

    def _ready(self, p):
        self.events.append(("ready", p))
        self.at_signal[id(p)] = p.main_grad.clone()

    def watched_backward(self, seed):
        """One window: watch, backward, finish; returns what finish() reported."""
        self.events.clear()
        self.at_signal.clear()
        self.buffer.start_window()
        self.readiness.watch()
        backward(self.model, seed)
        return self.readiness.finish()


def test_first_backward_learns_and_signals_nothing():
    watched = Watched()
    assert not watched.readiness.learned
    assert watched.watched_backward(seed=0) == watched.buffer.params  # all reported after it, in buffer order
    assert [kind for kind, _ in watched.events if kind == "ready"] == []
    assert watched.readiness.learned
    expected = watched.readiness.expected
    contributions = [p for kind, p in watched.events if kind == "contribution"]
    for p in watched.buffer.params:
        assert expected[id(p)] == sum(q is p for q in contributions)
    unused = list(watched.model.unused.parameters())
    assert all(expected[id(p)] == 0 for p in unused)
    # the tied weight is counted for both uses: the head's fused contribution and the embedding's autograd one
    assert expected[id(watched.model.embed.weight)] >= 2


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "memengine.checkpoint"])
def test_later_backwards_signal_each_parameter_at_its_last_contribution(recompute):
    watched = Watched(recompute=recompute)
    watched.watched_backward(seed=0)
    for seed in (1, 2):
        assert watched.watched_backward(seed=seed) == []  # every parameter was signalled during the backward
        ready = [p for kind, p in watched.events if kind == "ready"]
        assert sorted(map(id, ready)) == sorted(map(id, watched.buffer.params))  # each exactly once
        first_contribution = next(i for i, (kind, _) in enumerate(watched.events) if kind == "contribution")
        for p in watched.buffer.params:
            signal = next(i for i, (kind, q) in enumerate(watched.events) if kind == "ready" and q is p)
            contributions = [i for i, (kind, q) in enumerate(watched.events) if kind == "contribution" and q is p]
            if watched.readiness.expected[id(p)] == 0:
                assert contributions == [] and signal < first_contribution  # at watch()
            else:
                assert signal == contributions[-1] + 1  # right after its last contribution, not later
            # complete when signalled: what a reduction launched then would send
            assert torch.equal(watched.at_signal[id(p)], p.main_grad)


def test_tied_weight_is_not_signalled_after_its_fused_use_alone():
    watched = Watched()
    watched.watched_backward(seed=0)
    watched.watched_backward(seed=1)
    tied = watched.model.embed.weight
    first = next(i for i, (kind, q) in enumerate(watched.events) if kind == "contribution" and q is tied)
    signal = next(i for i, (kind, q) in enumerate(watched.events) if kind == "ready" and q is tied)
    # between the head's fused contribution and the signal, the rest of the backward ran (the embedding last)
    others = {id(q) for kind, q in watched.events[first:signal] if kind == "contribution" and q is not tied}
    assert {id(watched.model.up.weight), id(watched.model.norm.weight)} <= others


def test_an_extra_contribution_after_learning_raises():
    watched = Watched()
    watched.watched_backward(seed=0)
    watched.model.down_uses = 2  # the graph changes: down (and up) used twice
    with pytest.raises(RuntimeError, match=r"down\.(weight|bias) received contribution .* overlap=False"):
        watched.watched_backward(seed=1)


def test_fewer_contributions_are_reported_by_finish():
    """A parameter that gets fewer contributions than learned is never signalled during the backward (its
    gradient may still be partial as far as readiness knows): finish() reports it."""
    watched = Watched()
    watched.model.down_uses = 2
    watched.watched_backward(seed=0)
    watched.model.down_uses = 1
    late = watched.watched_backward(seed=1)
    assert {id(p) for p in late} == {id(p) for p in [*watched.model.up.parameters(), *watched.model.down.parameters()]}
    assert all(id(p) not in watched.at_signal for p in late)


def test_abandon_learns_nothing():
    watched = Watched()
    watched.buffer.start_window()
    watched.readiness.watch()
    backward(watched.model, seed=0)
    watched.readiness.abandon()
    assert not watched.readiness.learned
    watched.watched_backward(seed=1)  # learns now
    assert watched.readiness.learned
    assert [kind for kind, _ in watched.events if kind == "ready"] == []


def test_contributions_outside_watch_are_ignored_and_remove_detaches():
    watched = Watched()
    watched.watched_backward(seed=0)
    watched.buffer.start_window()
    backward(watched.model, seed=1)  # not watched: an earlier micro-batch, nothing signalled or raised
    backward(watched.model, seed=2)
    assert [kind for kind, _ in watched.events if kind == "ready"] == []
    watched.readiness.remove()
    watched.model.down_uses = 2
    watched.readiness.watch()  # removed: no longer hears contributions, so nothing raises
    backward(watched.model, seed=3)
