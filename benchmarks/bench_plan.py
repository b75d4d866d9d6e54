"""The recompute planner against measurement and against torch's checkpoint_sequential (CPU, fp32).

For each chain, every plan runs one real training step (forward, then backward of a loss that
reads the chain's output without a temporary of its size; parameter gradients preallocated, as
they are not activation memory) and is measured three ways:
  live peak    peak of live tensor bytes the step creates (memengine.plan.LiveBytes, a dispatch
               mode: sees every op, also on the meta device; the number simulate() predicts)
  alloc peak   peak of bytes through PyTorch's CPU allocator (profiler memory events: also sees
               kernels' scratch; the only one that sees torch.compile's buffers)
  recompute    matmul FLOPs of the step (FlopCounterMode) minus those of the plain step
and timed: median step time over rounds that run every row's step once each (so drifts of this
shared machine hit all rows alike), as a ratio to the plain eager step in the same run.

Chains: a GPT-style transformer (homogeneous) and residual MLP blocks whose hidden widths vary
from 1x to 32x the model width (heterogeneous). Rows:
  eager, torch.compile        the chain as is, no checkpointing
  checkpoint_sequential       torch's, with round(sqrt(n)) segments, use_reentrant=False
  none / sqrt / all           memengine plans (sqrt: checkpoint_sequential's plan)
  budget k/7                  "optimal" for 8 budgets from keeping everything down to the
                              smallest feasible one (prediction error, budget and monotonicity)
  optimal @ ckpt_seq peak     "optimal" with the budget set to checkpoint_sequential's measured
                              live peak: the anchor comparison
Last, a small-config LlamaForCausalLM (transformers, random weights) segmented from a budget:
the whole model's measured peak drop against the predicted one.

  python benchmarks/bench_plan.py [--blocks 16 --width 128 --seq 256 --batch 2]
"""

import argparse
import math
import os
import random
import sys

import torch
from torch.utils.checkpoint import checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402
from memengine.models import Block, MlpBlock  # noqa: E402
from memengine.plan import LiveBytes  # noqa: E402
from memengine.segments.apply import profile_sample  # noqa: E402


def transformer_chain(args):
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[Block(args.width, args.heads) for _ in range(args.blocks)])
    return blocks, torch.randn(args.batch, args.seq, args.width)


def heterogeneous_chain(args):
    rng = random.Random(0)
    torch.manual_seed(0)
    hidden = [args.width * 2 ** rng.randint(0, 5) for _ in range(args.blocks)]
    blocks = torch.nn.Sequential(*[MlpBlock(args.width, h) for h in hidden])
    return blocks, torch.randn(args.batch * args.seq, args.width)


class Step:
    """One training step of `blocks` run by `forward` (default: the blocks as they are)."""

    def __init__(self, blocks, base, forward=None):
        self.blocks, self.base, self.forward = blocks, base, forward or blocks
        self.weights = torch.randn(base.numel(), generator=torch.Generator().manual_seed(1))
        for p in blocks.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __call__(self):
        x = self.base.clone().requires_grad_()
        (self.forward(x).reshape(-1) @ self.weights).backward()


def memory_and_flops(step, device):
    with LiveBytes() as live:
        step()
    with FlopCounterMode(display=False) as flops:  # a separate step: its module tracking holds references
        step()
    return {"live": live.peak, "alloc": _common.peak_extra_bytes(step, device), "flops": flops.get_total_flops()}


def with_plan(blocks, plan, step):
    def run():
        handle = me.segment(blocks, plan=plan)
        try:
            step()
        finally:
            handle.remove()

    return run


def run_chain(name, blocks, base, args):
    device = torch.device("cpu")
    chain = me.plan.profile(blocks, base)
    n = len(chain)
    parameters = sum(p.numel() for p in blocks.parameters())
    print(f"\n{name}: {n} blocks, input {tuple(base.shape)}, {parameters:,} parameters")
    step = Step(blocks, base)
    segments = max(1, round(math.sqrt(n)))
    rows = [
        {"label": "eager", "step": step},
        {"label": "torch.compile", "step": Step(blocks, base, torch.compile(blocks))},
        {
            "label": "checkpoint_sequential",
            "step": Step(blocks, base, lambda x: checkpoint_sequential(blocks, segments, x, use_reentrant=False)),
        },
    ]
    plans = [(method, None, me.plan.solve(chain, method=method)) for method in ("none", "sqrt", "all")]
    largest = me.plan.simulate(chain, plans[0][2])["peak_bytes"]
    smallest = me.plan.smallest_feasible_budget(chain)
    for k in range(8):
        budget = largest - (largest - smallest) * k // 7
        plans.append((f"budget {k}/7", budget, me.plan.solve(chain, budget)))
    for row in rows:
        row.update(memory_and_flops(row["step"], device))
    torch_sqrt = rows[2]
    anchor_budget = torch_sqrt["live"]
    plans.append(("optimal @ ckpt_seq peak", anchor_budget, me.plan.solve(chain, anchor_budget)))
    for label, budget, plan in plans:
        row = {"label": label, "budget": budget, "plan": plan, "step": with_plan(blocks, plan, step)}
        row.update(memory_and_flops(row["step"], device), predicted=me.plan.simulate(chain, plan))
        rows.append(row)
    for row, seconds in zip(
        rows,
        (
            p50
            for _, p50, _ in _common.measure(
                [row["step"] for row in rows], device, min_time_s=0, min_repeats=args.rounds, max_repeats=args.rounds
            )
        ),
        strict=True,
    ):
        row["seconds"] = seconds

    eager = rows[0]
    print(
        f"{'plan':<24} {'budget':>10} {'predicted':>10} {'live peak':>10} {'error':>7} {'alloc peak':>10} "
        f"{'recompute':>10} {'simulated':>10} {'time':>6}  segments"
    )
    for row in rows:
        predicted = row.get("predicted")
        cells = [row.get("budget") or "", "", "", "", f"{row['flops'] - eager['flops']:.4g}"]
        if predicted:
            cells[1] = predicted["peak_bytes"]
            cells[2] = f"{100 * (predicted['peak_bytes'] - row['live']) / row['live']:+.2f}%"
            cells[3] = f"{predicted['recompute_flops']:.4g}"
        segments = " ".join(f"{s.start}-{s.end - 1}{s.policy[0]}" for s in row.get("plan") or [])
        print(
            f"{row['label']:<24} {cells[0]:>10} {cells[1]:>10} {row['live']:>10} {cells[2]:>7} {row['alloc']:>10} "
            f"{cells[4]:>10} {cells[3]:>10} {row['seconds'] / eager['seconds']:>5.2f}x  {segments}"
        )

    sweep = [row for row in rows if row["label"].startswith("budget")]
    worst = max(abs(r["predicted"]["peak_bytes"] - r["live"]) / r["live"] for r in sweep)
    print(
        f"prediction over the sweep: worst error {100 * worst:.2f}%; measured <= budget + 8 bytes of loss in "
        f"{sum(r['live'] <= r['budget'] + 8 for r in sweep)}/8; measured never rises as the budget falls: "
        f"{all(b['live'] <= a['live'] for a, b in zip(sweep, sweep[1:], strict=False))}"
    )
    anchor = rows[-1]
    ours, theirs = anchor["flops"] - eager["flops"], torch_sqrt["flops"] - eager["flops"]
    print(
        f"anchor: at checkpoint_sequential's peak ({anchor_budget:,} bytes) optimal recomputes {ours:.4g} FLOPs "
        f"against {theirs:.4g}: {ours / theirs if theirs else float('nan'):.2f}x; its peak {anchor['live']:,}; "
        f"step time {anchor['seconds'] / torch_sqrt['seconds']:.2f}x checkpoint_sequential's"
    )


def run_llama():
    """me.segment(model.model.layers, budget=..., sample=...) on a small-config LlamaForCausalLM
    (random weights): the whole model's measured peak drop against the planner's prediction."""
    try:
        import transformers
    except ImportError:
        print("\nLlamaForCausalLM: skipped, transformers is not installed")
        return
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step():
        model(input_ids=tokens, labels=tokens).loss.backward()

    def peak():
        with LiveBytes() as live:
            step()
        return live.peak

    chain = profile_sample(list(model.model.layers), lambda: model(input_ids=tokens))
    keep_all = me.plan.simulate(chain, me.plan.solve(chain, method="none"))["peak_bytes"]
    budget = (keep_all + me.plan.smallest_feasible_budget(chain)) // 2
    before = peak()
    handle = me.segment(model.model.layers, budget=budget, sample=lambda: model(input_ids=tokens))
    predicted = me.plan.simulate(handle.chain, handle.plan)["peak_bytes"]
    after = peak()
    handle.remove()
    print(
        f"\nLlamaForCausalLM, 8 layers, hidden 128, 2 x 256 tokens: layers' budget {budget:,} bytes; whole-model "
        f"peak {before:,} -> {after:,} bytes, a drop of {before - after:,} against {keep_all - predicted:,} "
        f"predicted ({100 * ((before - after) - (keep_all - predicted)) / (keep_all - predicted):+.2f}%)\n"
        + me.plan.report(handle.chain, handle.plan)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (each runs every row's step once)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, git {_common.git_sha()}")
    run_chain("transformer (homogeneous)", *transformer_chain(args), args)
    run_chain("residual MLPs, hidden 1x-32x (heterogeneous)", *heterogeneous_chain(args), args)
    run_llama()


if __name__ == "__main__":
    main()
