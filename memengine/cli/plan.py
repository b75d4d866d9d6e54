"""`python -m memengine plan`: plans a GPT-style decoder of any size on the meta device (nothing
is allocated) for an activation budget, and prints the plan next to the usual baselines."""

import sys

import torch

from memengine import plan
from memengine.models import Block
from memengine.segments import normalize_budget
from memengine.segments.solve import activation_budget


def add_arguments(parser):
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--budget",
        required=True,
        help="the blocks' activation budget: a size (24GiB) or a share of their activations without recompute (50%%)",
    )
    parser.add_argument("--method", default="optimal", choices=plan.METHODS)


def check(args):
    """The budget (bytes, or a share such as "50%"); ValueError("--flag ...: ...") naming the first flag the plan
    cannot use."""
    problems = [
        (args.layers < 1, "--layers", f"must be at least 1, got {args.layers}"),
        (args.hidden < 1, "--hidden", f"must be positive, got {args.hidden}"),
        (args.heads < 1, "--heads", f"must be positive, got {args.heads}"),
        (
            args.heads >= 1 and args.hidden % args.heads != 0,
            "--heads",
            f"{args.heads} does not divide --hidden {args.hidden}",
        ),
        (args.seq < 1, "--seq", f"must be positive, got {args.seq}"),
        (args.micro_batch < 1, "--micro-batch", f"must be positive, got {args.micro_batch}"),
    ]
    for failed, flag, message in problems:
        if failed:
            raise ValueError(f"{flag} {message}")
    try:
        budget = normalize_budget(args.budget)
    except ValueError:
        raise ValueError(
            f"--budget {args.budget}: give a size of the blocks' activations, such as 24GiB or 512MiB, or a share "
            "of them, such as 50%"
        ) from None
    return budget


def run(args):
    """Prints the plan; returns the exit status (2 with one line naming the flag for a value it cannot use)."""
    try:
        budget = check(args)
    except ValueError as error:
        print(f"python -m memengine plan: error: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        blocks = [Block(args.hidden, args.heads).to(dtype) for _ in range(args.layers)]
        sample = torch.empty(args.micro_batch, args.seq, args.hidden, dtype=dtype, requires_grad=True)
    chain = plan.profile(blocks, sample)
    budget = activation_budget(chain, budget)  # "50%": as Engine(budget="50%"), that share of the activations
    parameters = sum(p.numel() for b in blocks for p in b.parameters())
    print(
        f"{args.layers} blocks, hidden {args.hidden}, {args.heads} heads, sequence {args.seq}, micro-batch "
        f"{args.micro_batch}, {args.dtype}: {parameters / 1e9:.2f} B parameters in the blocks; budget {budget:,} bytes"
    )
    try:
        chosen = plan.solve(chain, budget, method=args.method)
    except plan.InfeasibleBudgetError as error:
        print(f"infeasible: {error}")
        return 1
    print(plan.report(chain, chosen))
    print("\nbaselines (peak bytes, recompute FLOPs):")
    for method in ("none", "sqrt", "all"):
        result = plan.simulate(chain, plan.solve(chain, method=method))
        fits = "fits" if result["peak_bytes"] <= budget else "over budget"
        print(f"  {method:<5} {result['peak_bytes']:>18,} {result['recompute_flops']:>12.4g}  {fits}")
    return 0
