"""`python -m memengine demo`: how much memory memengine saves, at what speed and accuracy, against
plain PyTorch (full batch, gradient accumulation, checkpointing, fp32 accumulation), measured on
this machine. The experiment is memengine.studies.demo; this module is its command line: flags,
progress bar (tqdm, when installed), the table, and the files in --out: results.json, results.csv,
memory_vs_time.png and loss.png (the plots need matplotlib: the demo extra, `pip install matplotlib tqdm`,
or `pip install --no-build-isolation ".[demo]"` in the checkout)."""

import csv
import dataclasses
import json
import pathlib
import sys

import torch

from memengine.studies import demo

MIB = 2**20


def _in_mib(count):
    return f"{count / MIB:.2f}"


# The table's numeric columns: (header, field of results.csv, format). The CSV carries each exactly.
COLUMNS = [
    ("peak MiB", "peak_bytes", _in_mib),
    ("params", "parameter_bytes", _in_mib),
    ("grads", "gradient_bytes", _in_mib),
    ("optim", "optimizer_bytes", _in_mib),
    ("other", "other_bytes", _in_mib),
    ("step s", "step_time_s", lambda v: f"{v:.3f}"),
    ("x row1", "step_time_ratio", lambda v: f"{v:.2f}"),
    ("tok/s", "tokens_per_s", lambda v: f"{v:.0f}"),
    ("x row1", "tokens_per_s_ratio", lambda v: f"{v:.2f}"),
    ("grad err", "gradient_error", lambda v: f"{v:.2e}"),
    ("loss 1st", "first_loss", lambda v: f"{v:.3f}"),
    ("loss last", "final_loss", lambda v: f"{v:.3f}"),
]
CSV_FIELDS = [
    "row",
    "method",
    "label",
    *(field for _, field, _ in COLUMNS),
    "predicted_peak_bytes",
    "prediction_error",
    "budget_bytes",
    "plan",
]
PLOT_SIZE = (8, 5)  # inches, at PLOT_DPI: the PNGs are 800 x 500 pixels
PLOT_DPI = 100


def add_arguments(parser):
    defaults = demo.DemoConfig()
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--device", default="cuda" if cuda else "cpu", help="cpu or cuda (default: cuda when available)"
    )
    parser.add_argument("--dtype", choices=list(demo.DTYPES), default=defaults.dtype, help="parameter dtype")
    parser.add_argument(
        "--model",
        choices=list(demo.MODELS),
        default=defaults.model,
        help=(
            "gpt: memengine's GPT fixture; gpt2, llama: a Hugging Face model from a small config (random weights, no "
            "download; needs transformers)"
        ),
    )
    for flag, help_text in (
        ("--layers", "blocks"),
        ("--hidden", "width"),
        ("--heads", "attention heads"),
        ("--seq", "sequence length (tokens are bytes)"),
        ("--vocab", "the model's vocabulary (the bytes are its ids 0-255)"),
        ("--batch", "rows per optimizer step"),
        ("--micro-batch", "rows per micro-batch (rows 2-6)"),
        ("--steps", f"optimizer steps per method (at least {demo.MIN_STEPS})"),
    ):
        default = getattr(defaults, flag[2:].replace("-", "_"))
        quick = demo.QUICK.get(flag[2:].replace("-", "_"))
        suffix = f"; default {default}" + (f", {quick} with --quick" if quick is not None else "")
        parser.add_argument(flag, type=int, default=None, help=help_text + suffix)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    parser.add_argument(
        "--budget",
        default=demo.DEFAULT_BUDGET,
        help=(
            "row 6's whole-step memory budget: a size (2GiB, 300MiB) or a percentage P%% of row 5's activations kept "
            "(row 5's predicted whole-step peak minus the other 100-P%% of its activations); default 50%%"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute on a laptop CPU)")
    parser.add_argument("--out", default="memengine-demo", help="folder for the results and plots")


def make_config(args):
    """The DemoConfig of the parsed flags (--quick fills the sizes not given); ValueError naming a bad flag."""
    sizes = {**(demo.QUICK if args.quick else {})}
    for name in ("layers", "hidden", "heads", "seq", "vocab", "batch", "micro_batch", "steps"):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    config = demo.DemoConfig(
        device=args.device, dtype=args.dtype, model=args.model, budget=args.budget, lr=args.lr, **sizes
    )
    config.check()
    return config


def run(args):
    """Runs the demo for parsed flags; returns the exit status (2 with a one-line error for a bad value)."""
    try:
        config = make_config(args)
    except ValueError as error:
        return _error(error)
    progress, close = _progress_bar(demo.progress_units(config))
    try:
        results = demo.run(config, progress)
    except demo.BudgetTooSmall as error:
        close()
        return _error(f"--budget {args.budget}: {error}")
    close()
    print(render(results))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = write_results(results, out)
    try:
        written += plot(results, out)
    except ImportError:
        print(
            "plots skipped: matplotlib is not installed; install the demo extra (`pip install matplotlib tqdm`, or "
            '`pip install --no-build-isolation ".[demo]"` in the checkout) and rerun to get memory_vs_time.png and '
            "loss.png"
        )
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0


def _error(message):
    print(f"python -m memengine demo: error: {message}", file=sys.stderr)
    return 2


def _progress_bar(total):
    """(progress(description, advance), close()): a tqdm bar on stderr, or a line per step without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        shown = set()

        def progress(description, advance=1):
            phase = description.split(" pytorch")[0].split(" memengine")[0]
            if phase not in shown:
                shown.add(phase)
                print(f"demo: {phase}", file=sys.stderr, flush=True)

        return progress, lambda: None
    bar = tqdm(total=total, desc="memengine demo", file=sys.stderr, unit="step", leave=False)

    def progress(description, advance=1):
        bar.set_description(description, refresh=False)
        bar.update(advance)

    return progress, bar.close


def _cells(results):
    """[(row number, label, [formatted numbers in COLUMNS order])] of the table."""
    rows = []
    for number, method in enumerate(results.methods, 1):
        values = csv_row(number, method)
        rows.append((number, method.label, [fmt(values[field]) for _, field, fmt in COLUMNS]))
    return rows


def render(results):
    """The terminal table, row 6's plan, the claims checked on this run and the notes."""
    config = results.config
    lines = [
        f"memengine demo: {config['model']} model, {config['layers']} layers, hidden {config['hidden']}, "
        f"{config['heads']} heads, {results.parameters / 1e6:.2f} M parameters, {config['dtype']}, on "
        f"{results.environment['device']} (CPU threads: {results.environment['threads']}), torch "
        f"{results.environment['torch']}",
        f"each step: {config['batch']} rows of {config['seq']} bytes of memengine's own source "
        f"({results.corpus_bytes / 1024:.0f} KiB embedded, rows of random length, {results.tokens_per_step:.0f} "
        f"tokens on average), micro-batches of {config['micro_batch']} (rows 2-6); {config['steps']} AdamW steps "
        f"per method, lr {config['lr']:g}, all from the same weights on the same data",
        "",
    ]
    widths = [max(len(header), 9) for header, _, _ in COLUMNS]
    label_width = max(len(m.label) for m in results.methods) + 4
    header = f"{'':{label_width}}" + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(COLUMNS, widths, strict=True))
    lines += [header, "-" * len(header)]
    for number, label, cells in _cells(results):
        lines.append(
            f"{f'{number} {label}':<{label_width}}" + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    budgeted = results.methods[-1]
    lines += [
        "",
        "peak: the whole step's peak allocated bytes (resident tensors + the allocator's peak during the step); "
        "grads: one gradient set in the row's gradient dtype; optim: fp32 masters + AdamW moments; other: the rest "
        "of the peak (activations, batch, temporaries). step time: median, interleaved; grad err: first step's "
        "gradient vs an fp64 oracle of the full-batch mean token loss (relative L2).",
        f"row 6: budget {_mib(budgeted.budget_bytes)} ({results.budget_rule}); plan: {budgeted.plan}; predicted "
        f"peak {_mib(budgeted.predicted_peak_bytes)}, measured {_mib(budgeted.peak_bytes)} "
        f"({budgeted.prediction_error:+.1%}); smallest feasible budget {_mib(results.smallest_feasible_budget)}, "
        f"no recompute {_mib(results.no_recompute_peak)}",
        "",
        "claims, checked on this run:",
    ]
    lines += [f"  [{'ok' if holds else 'FAILS'}] {claim}" for claim, holds in results.claims]
    lines += [f"note: {note}" for note in results.notes]
    return "\n".join(lines)


def _mib(count):
    return f"{_in_mib(count)} MiB"


def csv_row(number, method):
    values = dataclasses.asdict(method)
    values.update(
        row=number,
        method=method.name,
        first_loss=method.first_loss,
        final_loss=method.final_loss,
        prediction_error=method.prediction_error,
    )
    return {field: values[field] for field in CSV_FIELDS}


def write_results(results, out):
    """results.json (everything, loss curves included) and results.csv (a row per method); returns the paths."""
    json_path, csv_path = out / "results.json", out / "results.csv"
    json_path.write_text(json.dumps(results.to_dict(), indent=2) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for number, method in enumerate(results.methods, 1):
            writer.writerow(csv_row(number, method))
    return [json_path, csv_path]


def plot(results, out):
    """memory_vs_time.png (memory_figure) and loss.png (loss_figure); returns the paths. ImportError without
    matplotlib."""
    from matplotlib import pyplot

    paths = [out / "memory_vs_time.png", out / "loss.png"]
    for make_figure, path in zip((memory_figure, loss_figure), paths, strict=True):
        figure = make_figure(results)
        figure.savefig(path)
        pyplot.close(figure)
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def memory_figure(results):
    """Per method: its whole-step peak as stacked bars of what it is made of, row 6's budget a line, and its step
    time, both axes from zero, one label per bar (none can overprint another)."""
    pyplot = _pyplot()
    import matplotlib.ticker

    methods = results.methods
    names = [f"{number} {method.label}" for number, method in enumerate(methods, 1)]
    rows = list(range(len(methods)))[::-1]  # row 1 at the top
    figure, (memory, time_axes) = pyplot.subplots(
        1, 2, figsize=PLOT_SIZE, dpi=PLOT_DPI, sharey=True, gridspec_kw={"width_ratios": [3, 1]}
    )
    left = [0.0] * len(methods)
    parts = [
        ("parameters", "parameter_bytes"),
        ("gradients", "gradient_bytes"),
        ("optimizer state", "optimizer_bytes"),
        ("activations, loss, temporaries", "other_bytes"),
    ]
    for label, field in parts:
        widths = [getattr(method, field) / MIB for method in methods]
        memory.barh(rows, widths, left=left, label=label, height=0.6)
        left = [start + width for start, width in zip(left, widths, strict=True)]
    for row, total in zip(rows, left, strict=True):
        memory.text(total, row, f" {total:.0f}", va="center", fontsize=8)
    memory.axvline(results.budget_bytes / MIB, linestyle="--", color="gray", label="row 6's budget")
    memory.set_yticks(rows, names, fontsize=8)
    memory.set_xlim(0, max(left) * 1.15)
    # No tick label at the panel's right end, where the time panel's first one begins.
    memory.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(prune="upper"))
    memory.set_xlabel("whole-step peak memory (MiB)")
    memory.grid(axis="x", alpha=0.3)
    times = [method.step_time_s for method in methods]
    time_axes.barh(rows, times, height=0.6, color="gray")
    time_axes.set_xlim(0, max(times) * 1.2)
    time_axes.set_xlabel("step time (s, median)")
    time_axes.grid(axis="x", alpha=0.3)
    # The legend below the panels, where no bar or label can run into it.
    figure.legend(*memory.get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=7, frameon=False)
    figure.suptitle("memory and time per step")
    figure.tight_layout(w_pad=2.5, rect=(0, 0.05, 1, 1))  # room between the panels' outer tick labels
    return figure


def loss_figure(results):
    """The losses, and each method's difference from row 1's, where the curves would lie on top of each other."""
    pyplot = _pyplot()
    import matplotlib.ticker

    methods = results.methods
    figure, (losses, differences) = pyplot.subplots(2, 1, figsize=PLOT_SIZE, dpi=PLOT_DPI, sharex=True)
    reference = methods[0].losses
    for number, method in enumerate(methods, 1):
        steps = range(1, len(method.losses) + 1)
        losses.plot(steps, method.losses, marker="o", markersize=3, label=f"{number} {method.label}")
        differences.plot(
            steps, [a - b for a, b in zip(method.losses, reference, strict=True)], marker="o", markersize=3
        )
    differences.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    differences.set_xlabel("optimizer step")
    losses.set_ylabel("mean token loss")
    differences.set_ylabel("minus row 1's")
    # Its tick labels on the right: the two panels' labels at their common edge cannot meet.
    differences.yaxis.tick_right()
    losses.set_title("training loss (same weights, same data)")
    for axes in (losses, differences):
        axes.grid(alpha=0.3)
    losses.legend(fontsize=7)
    figure.tight_layout()
    return figure
