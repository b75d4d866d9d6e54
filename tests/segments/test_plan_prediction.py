"""me.plan's memory model against measured peaks: simulate() within 5% of the peak of live tensor
bytes (memengine.plan.LiveBytes) of a real forward and backward under me.segment, the measured
peak within the budget, and never rising as the budget falls. Also: profile() leaves no trace."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import memengine as me
from memengine.models import Block, MlpBlock
from memengine.plan import LiveBytes, Segment


def transformer_chain():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(32, 4) for _ in range(6)]), torch.randn(2, 16, 32)


def heterogeneous_chain():
    torch.manual_seed(0)
    hidden = [32, 512, 64, 1024, 32, 256, 128, 768]
    return torch.nn.Sequential(*[MlpBlock(32, h) for h in hidden]), torch.randn(48, 32)


# The loss (an fp32 scalar) and the gradient autograd seeds it with: the step's only tensors that
# the chain does not make, so outside its budget.
LOSS_BYTES = 8


def measured_peak(blocks, base, plan, count_flops=False):
    """Peak live bytes of one training step of the chain under `plan` (parameter gradients
    preallocated: they are not activation memory), and optionally the step's matmul FLOPs."""
    for p in blocks.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    weights = torch.randn(base.numel())  # the loss reads the output without a temporary of its size
    handle = me.segment(blocks, plan=plan)
    try:
        with LiveBytes() as live:
            x = base.clone().requires_grad_()
            (blocks(x).reshape(-1) @ weights).backward()
        if not count_flops:
            return live.peak
        # A separate step: FlopCounterMode's module tracking holds extra references.
        with FlopCounterMode(display=False) as flops:
            x = base.clone().requires_grad_()
            (blocks(x).reshape(-1) @ weights).backward()
        return live.peak, flops.get_total_flops()
    finally:
        handle.remove()


@pytest.mark.parametrize("make", [transformer_chain, heterogeneous_chain])
def test_simulated_peak_matches_the_measured_one(make):
    blocks, base = make()
    chain = me.plan.profile(blocks, base)
    n = len(chain)
    plans = {method: me.plan.solve(chain, method=method) for method in ("none", "sqrt", "all")}
    plans["selective"] = [Segment(0, n, "selective")]
    plans["mixed"] = [Segment(0, 2, "recompute"), Segment(2, 4, "selective"), Segment(4, n, "keep")]
    _, plain_flops = measured_peak(blocks, base, plans["none"], count_flops=True)
    for name, plan in plans.items():
        predicted = me.plan.simulate(chain, plan)
        measured, flops = measured_peak(blocks, base, plan, count_flops=True)
        assert abs(predicted["peak_bytes"] - measured) <= 0.05 * measured, (name, predicted, measured)
        if name != "selective" and name != "mixed":  # selective recomputes no matmul: its FLOPs are 0
            assert flops - plain_flops == predicted["recompute_flops"], (name, flops - plain_flops, predicted)

    # 8 budgets from keeping everything down to the smallest feasible one
    largest = me.plan.simulate(chain, plans["none"])["peak_bytes"]
    smallest = me.plan.smallest_feasible_budget(chain)
    previous = None
    for k in range(8):
        budget = largest - (largest - smallest) * k // 7
        plan = me.plan.solve(chain, budget)
        predicted = me.plan.simulate(chain, plan)["peak_bytes"]
        measured = measured_peak(blocks, base, plan)
        assert abs(predicted - measured) <= 0.05 * measured, (budget, plan, predicted, measured)
        assert measured <= budget + LOSS_BYTES, (budget, plan, measured)
        assert previous is None or measured <= previous, (budget, plan, measured, previous)
        previous = measured


def test_profile_leaves_gradients_hooks_and_buffers_alone():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), me.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)
    )
    buffer = me.GradBuffer(blocks)
    calls = []
    for p in blocks.parameters():
        p.register_hook(lambda g: calls.append(g))
    buffer.start_window()
    blocks(torch.randn(4, 8)).sum().backward()
    buffer.finish_window()
    grads = {name: (None if p.grad is None else p.grad.clone()) for name, p in blocks.named_parameters()}
    main_grads = {name: p.main_grad.clone() for name, p in blocks.named_parameters()}
    buffers = {name: b.clone() for name, b in blocks.named_buffers()}
    calls.clear()

    chain = me.plan.profile(blocks, torch.randn(4, 8))
    assert all(b > 0 for b in chain.backward_extra_bytes)
    assert calls == []
    for name, p in blocks.named_parameters():
        assert (p.grad is None) == (grads[name] is None) and (p.grad is None or torch.equal(p.grad, grads[name]))
        assert torch.equal(p.main_grad, main_grads[name]), name
    for name, b in blocks.named_buffers():
        assert torch.equal(b, buffers[name]), name
