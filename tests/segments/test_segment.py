"""me.segment: every policy, multi-block segments, nn.Sequential and the Hugging Face ModuleList
loop; loss, gradients and BatchNorm statistics bit-identical to running without a plan."""

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.plan import Segment
from memengine.segments.apply import profile_sample as profile_recorded


class Block(torch.nn.Module):
    def __init__(self, width=12):
        super().__init__()
        self.up = torch.nn.Linear(width, 3 * width)
        self.down = torch.nn.Linear(3 * width, width)
        self.norm = torch.nn.BatchNorm1d(width)

    def forward(self, x):
        return self.norm(x + self.down(F.dropout(F.gelu(self.up(x)), p=0.2, training=self.training)))


class DecoderLayer(torch.nn.Module):
    """The Hugging Face calling convention: extra positional and keyword arguments, tuple output."""

    def __init__(self, width=12):
        super().__init__()
        self.attn = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Linear(width, width)

    def forward(self, hidden, mask, position=None):
        h = hidden + torch.tanh(self.attn(hidden)) * mask + position
        return (h + F.dropout(self.mlp(h), p=0.2, training=self.training), "cache")


class Decoder(torch.nn.Module):
    def __init__(self, layers=5, width=12):
        super().__init__()
        self.layers = torch.nn.ModuleList(DecoderLayer(width) for _ in range(layers))

    def forward(self, x):
        mask = torch.ones(x.shape[-1])
        position = torch.linspace(0, 1, x.shape[-1])
        for layer in self.layers:
            x, cache = layer(x, mask, position=position)
            assert cache == "cache"
        return x


PLANS = {
    "recompute pairs": [Segment(0, 2, "recompute"), Segment(2, 4, "recompute"), Segment(4, 5, "keep")],
    "selective": [Segment(0, 3, "selective"), Segment(3, 5, "keep")],
    "mixed": [Segment(0, 1, "keep"), Segment(1, 3, "selective"), Segment(3, 5, "recompute")],
    "all": [Segment(i, i + 1, "recompute") for i in range(5)],
}


def run(model, x, seed=0):
    torch.manual_seed(seed)
    loss = model(x).square().mean()
    loss.backward()
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("kind", ["sequential", "modulelist"])
def test_bit_identical_to_no_plan(kind, plan_name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block() for _ in range(5))) if kind == "sequential" else Decoder()
    twin = type(model)() if kind == "modulelist" else torch.nn.Sequential(*(Block() for _ in range(5)))
    twin.load_state_dict(model.state_dict())
    twin_blocks = twin if kind == "sequential" else twin.layers
    x = torch.randn(6, 12, requires_grad=True)
    handle = me.segment(twin_blocks, plan=PLANS[plan_name])
    expected_loss, expected_grads = run(model, x)
    loss, grads = run(twin, x)
    assert torch.equal(loss, expected_loss)
    for a, b in zip(grads, expected_grads, strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm statistics included
    handle.remove()
    assert all("forward" not in block.__dict__ for block in twin_blocks)


def test_solved_from_a_budget_with_a_recorded_sample():
    torch.manual_seed(1)
    model = Decoder(layers=6, width=32)
    x = torch.randn(64, 32)
    chain = profile_recorded(list(model.layers), lambda: model(x))
    none = me.plan.simulate(chain, me.plan.solve(chain, method="none"))["peak_bytes"]
    smallest = me.plan.smallest_feasible_budget(chain)
    handle = me.segment(model.layers, budget=(none + smallest) // 2, sample=lambda: model(x))
    assert any(s.policy != "keep" for s in handle.plan)
    twin = Decoder(layers=6, width=32)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(run(model, x.requires_grad_())[0], run(twin, x)[0])
    with pytest.raises(ValueError, match="already carry a plan"):
        me.segment(model.layers, plan=[Segment(0, 6, "keep")])
    handle.remove()
    with pytest.raises(ValueError, match="pass a plan, or a budget together with a sample"):
        me.segment(model.layers, budget=100)
