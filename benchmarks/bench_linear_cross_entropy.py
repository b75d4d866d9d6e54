"""The vocabulary end of a training step: one micro-batch's forward, loss and backward on a patched bf16
Llama-shaped model (Hugging Face, random weights, gradient checkpointing on), three ways, in one run:

  hf       Hugging Face's own loss: model(input_ids, labels=labels).loss (bf16 logits, an fp32 copy, log-softmax)
  logits   memengine.causal_lm_loss through the logits (what it did before the fused path: fp32 cross-entropy
           over the model's bf16 logits)
  fused    memengine.causal_lm_loss today: memengine.linear_cross_entropy over the final hidden states, logits
           one bounded fp32 tile at a time, the head's gradient added into the fp32 buffer tile by tile

Per vocabulary size it prints the step's transient peak (bytes the CPU allocator holds above what was live
before the micro-batch: the profiler's memory events) and the time (median of interleaved repeats, as a ratio
to hf), and the loss of each path (they agree to about 1e-5 relative). Then the loss kernel alone on the
same shapes (hidden [tokens, H] and the head's weight): eager PyTorch (bf16 head, fp32 cross-entropy),
torch.compile of the same (both return the head's gradient as a bf16 .grad), and memengine.linear_cross_entropy
with the head's gradient going into its fp32 GradBuffer, forward and backward.

With --peers, the peers' fused losses join the kernel table when they are installed (pip install liger-kernel
cut-cross-entropy; nothing else here needs them): Liger-Kernel's LigerFusedLinearCrossEntropyLoss and Cut
Cross-Entropy's linear_cross_entropy. Both are Triton kernels written for GPUs. On a CPU, Liger runs only under
Triton's interpreter (TRITON_INTERPRET=1 in the environment): its peak is the allocator's, interpreter copies of
the kernels' arguments included, and its time is the interpreter's, so none is printed. CCE's own kernel does not
run under the interpreter; its impl="torch_compile" (torch.compile of full logits) does and is timed.

  python benchmarks/bench_linear_cross_entropy.py [--vocab 32000 128256 256000 --tokens 512 --hidden 256] [--peers]
"""

import argparse
import csv
import importlib.util
import os
import statistics
import time
import warnings

import _common
import torch
import torch.nn.functional as F

import memengine as me
from memengine.engine import losses
from memengine.segments.allocator_peak import peak_extra_bytes


def llama(vocab, hidden, layers):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def step_functions(model, batch):
    """{path: a function running one micro-batch's forward, loss and backward into the buffer; returns the loss}"""
    buffer = me.patch(model)

    def hf():
        buffer.start_window()
        output = model(input_ids=batch["input_ids"], labels=batch["labels"])
        output.loss.backward()
        return float(output.loss)

    def through(fused):
        def run():
            buffer.start_window()
            loss, count = me.causal_lm_loss(model, batch, fused=fused)
            (loss / count).backward()
            return float(loss / count)

        return run

    assert losses.language_model_parts(model) is not None, "the fused path must recognise the model"
    return {"hf": hf, "logits": through(False), "fused": through(True)}


def interleaved_times(functions, repeats):
    """{name: [seconds per call]}: the functions take turns, so a shared machine's drifts hit them alike."""
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def csv_row(kernel, provider, shape, seconds, peak_bytes):
    """A row of DESIGN.md's benchmark CSV (benchmarks/_common.CSV_FIELDS) from one provider's samples."""
    fifths = statistics.quantiles(seconds, n=5) if len(seconds) > 1 else [seconds[0]] * 4
    p20, p50, p80 = fifths[0], statistics.median(seconds), fifths[3]
    return {
        "kernel": kernel,
        "provider": provider,
        "shape": shape,
        "dtype": "bfloat16",
        "p50_ms": p50 * 1e3,
        "p20_ms": p20 * 1e3,
        "p80_ms": p80 * 1e3,
        "peak_bytes": peak_bytes,
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }


def append_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    sha = _common.git_sha()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_common.CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "git_sha": sha})
    print(f"appended {len(rows)} rows to {path}")


def kernel_functions(hidden, weight, labels):
    """The loss kernel alone: eager bf16 head + fp32 cross-entropy, its torch.compile, and memengine's."""

    def eager_math(h, w):
        return F.cross_entropy((h @ w.t()).float(), labels, reduction="sum")

    compiled_math = torch.compile(eager_math)

    def run(loss_fn):
        def call():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            loss_fn(h, w).backward()

        return call

    # memengine as a patched model uses it: the head's gradient goes into its fp32 buffer (allocated before the
    # measurement, as a GradBuffer is), not into a returned [vocabulary, hidden] tensor as eager's .grad.
    head = torch.nn.Parameter(weight.detach().clone())
    buffer = me.GradBuffer([head])

    def memengine_call():
        buffer.start_window()
        me.linear_cross_entropy(hidden.detach().requires_grad_(), head, labels)[0].backward()

    return {"eager": run(eager_math), "torch.compile": run(compiled_math), "memengine": memengine_call}


def peer_functions(hidden, weight, labels):
    """{name: (function, timed)} for the installed peers (see the module docstring)."""
    peers = {}

    def run(loss_fn):
        def call():
            loss_fn(hidden.detach().requires_grad_(), weight.detach().requires_grad_()).backward()

        return call

    if importlib.util.find_spec("liger_kernel") is None:
        print("    liger-kernel is not installed: no Liger row")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        print("    Liger runs on a CPU only under TRITON_INTERPRET=1: no Liger row")
    else:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        peers["liger (interpreted)"] = (run(lambda h, w: liger(w, h, labels)), False)
    if importlib.util.find_spec("cut_cross_entropy") is None:
        print("    cut-cross-entropy is not installed: no CCE row")
    else:
        from cut_cross_entropy import linear_cross_entropy

        peers["cce torch_compile"] = (
            run(lambda h, w: linear_cross_entropy(h, w, labels, reduction="sum", impl="torch_compile")),
            True,
        )
    return peers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 256000])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-kernel", action="store_true", help="skip the loss kernel alone")
    parser.add_argument("--peers", action="store_true", help="add Liger-Kernel and Cut Cross-Entropy when installed")
    parser.add_argument(
        "--csv", default=os.path.join(_common.ROOT, "benchmarks", "results", "linear_cross_entropy.csv")
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; {args.tokens} tokens, hidden {args.hidden}"
    )
    print(f"{'vocab':>8} {'path':>7} {'transient peak MiB':>19} {'vs hf':>6} {'time vs hf':>10} {'loss':>10}")
    rows = []
    for vocab in args.vocab:
        model = llama(vocab, args.hidden, args.layers)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (1, args.tokens), generator=generator)
        batch = {"input_ids": ids, "labels": ids}
        functions = step_functions(model, batch)
        values = {name: function() for name, function in functions.items()}  # warm up, and the losses
        peaks = {name: peak_extra_bytes(function, torch.device("cpu")) for name, function in functions.items()}
        samples = interleaved_times(functions, args.repeats)
        times = {name: statistics.median(values) for name, values in samples.items()}
        shape = f"{args.tokens}x{args.hidden}x{vocab}"
        rows += [csv_row("lm_step", name, shape, samples[name], peaks[name]) for name in functions]
        for name in functions:
            print(
                f"{vocab:>8} {name:>7} {peaks[name] / 2**20:>19.1f} {peaks[name] / peaks['hf']:>6.3f} "
                f"{times[name] / times['hf']:>10.2f} {values[name]:>10.6f}"
            )
        me.unpatch(model)
        if args.no_kernel:
            continue
        head = model.lm_head.weight
        hidden = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16, generator=generator)
        labels = torch.randint(0, vocab, (args.tokens,), generator=generator)
        kernels = kernel_functions(hidden, head, labels)
        for function in kernels.values():
            function()  # compile outside the measurements
        peaks = {name: peak_extra_bytes(function, torch.device("cpu")) for name, function in kernels.items()}
        samples = interleaved_times(kernels, args.repeats)
        times = {name: statistics.median(values) for name, values in samples.items()}
        rows += [csv_row("linear_cross_entropy", name, shape, samples[name], peaks[name]) for name in kernels]
        for name in kernels:
            print(
                f"{vocab:>8} {'kernel ' + name:>22} peak {peaks[name] / 2**20:8.1f} MiB, time vs eager "
                f"{times[name] / times['eager']:.2f}"
            )
        if not args.peers:
            continue
        for name, (function, timed) in peer_functions(hidden, head, labels).items():
            function()  # compile outside the measurements
            peak = peak_extra_bytes(function, torch.device("cpu"))
            ratio = "not measured (interpreter)"
            if timed:  # against eager again, interleaved in the same run
                pair = interleaved_times({"peer": function, "eager": kernels["eager"]}, args.repeats)
                ratio = f"{statistics.median(pair['peer']) / statistics.median(pair['eager']):.2f}"
                rows.append(csv_row("linear_cross_entropy", "peer " + name, shape, pair["peer"], peak))
            print(f"{vocab:>8} {'peer ' + name:>22} peak {peak / 2**20:8.1f} MiB, time vs eager {ratio}")
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
