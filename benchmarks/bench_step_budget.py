"""Engine(budget=B), the whole-step memory budget, against measurement (CPU, fp32, AdamW).

On a small-config LlamaForCausalLM (transformers, random weights): the baseline row trains
eagerly with no budget (no recompute); then 5 budgets from the smallest feasible whole-step peak
to just under the no-recompute peak (both from engine.memory_report()). Each row trains two
steps with measure_memory=True and prints the budget, the predicted and measured whole-step
peak (memengine.engine.step_memory.measure_step_peak: resident storages plus the profiler's
allocator peak on CPU) of the first step (planning included, no optimizer state during its
micro-batches) and of the second (optimizer state resident), the error, and the plan.

torch.compile is not a row: the budget is met by recomputing the repeated blocks eagerly under
memengine's checkpointing, and the planner's memory model is measured on eager execution;
compiling the step would fuse and reorder allocations (and partition recomputation itself), so
the prediction would not describe it. The comparison that matters here is against eager
no-recompute training, the peak the budget is cutting down from.

  python benchmarks/bench_step_budget.py [--layers 4 --hidden 64 --seq 64 --vocab 256]
"""

import argparse
import functools
import warnings

import torch

import memengine as me


def llama(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq,
        use_cache=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def train(args, budget):
    engine = me.Engine(
        llama(args),
        functools.partial(torch.optim.AdamW, lr=1e-3),
        micro_batch_size=args.micro_batch,
        budget=budget,
        measure_memory=True,
    )
    generator = torch.Generator().manual_seed(1)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-recompute warning of the largest budget
        for _ in range(2):
            engine.step(torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator))
            reports.append(engine.memory_report())
    return reports


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    baseline = train(args, None)
    smallest, largest = baseline[-1].smallest_feasible_budget, baseline[-1].no_recompute_peak
    print(baseline[-1])
    print()
    header = f"{'row':<14} {'budget':>11} {'step':>4} {'predicted':>11} {'measured':>11} {'error %':>8}  plan"
    print(header)
    rows = [("eager, none", None, baseline)]
    rows += [(f"budget {k}/4", smallest + (largest - 1 - smallest) * k // 4, None) for k in range(5)]
    for name, budget, reports in rows:
        reports = reports or train(args, budget)
        for step, report in enumerate(reports, start=1):
            predicted = report.predicted_first_step_peak if step == 1 else report.predicted_peak
            error = (predicted - report.measured_peak) / report.measured_peak * 100
            shown = f"{budget:>11,}" if budget is not None else f"{'-':>11}"
            fits = "" if budget is None or report.measured_peak <= budget else "  OVER BUDGET"
            print(
                f"{name:<14} {shown} {step:>4} {predicted:>11,} {report.measured_peak:>11,} {error:>+8.2f}  "
                f"{report.plan}{fits}"
            )


if __name__ == "__main__":
    main()
