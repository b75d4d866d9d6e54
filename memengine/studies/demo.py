"""The experiment behind `python -m memengine demo`: the same GPT-style model trained for a few
steps, from the same initial weights on the same data, by the ways people train today and by
memengine, with each one's whole-step peak memory, step time, first-step gradient error and loss.

Methods (rows of the demo's table):
  1 pytorch-full-batch      plain PyTorch, the whole batch in one forward and backward (no accumulation)
  2 pytorch-accumulation    gradient accumulation as the articles do it: bf16 .grad accumulated by
                            autograd, each micro-batch's mean loss divided by the number of micro-batches
  3 pytorch-checkpointing   row 2 plus torch.utils.checkpoint (non-reentrant) around every block
  4 pytorch-fp32-grads      the careful baseline: autograd accumulates into fp32 .grad (p.grad_dtype),
                            each micro-batch's summed loss divided by the batch's token count
  5 memengine               memengine.Engine: fused fp32 accumulation, token-normalised
  6 memengine-budget        memengine.Engine(budget=...): the planner picks which blocks to recompute

Rows 1-4 step the same optimizer as memengine: torch.optim.AdamW over fp32 master weights of the
low-precision parameters (the usual mixed-precision recipe; rows 1-3 cast their bf16 gradients to
fp32 for the step, row 4's gradients are fp32 already), so rows differ in how gradients are made
and kept, not in the optimizer. --dtype fp32 needs no masters: every row steps the parameters.

Data: the embedded corpus is the bytes of memengine's own Python sources (nothing is downloaded, no
data file ships for it); tokens are bytes, the ids 0-255 of a model vocabulary of --vocab entries (default
32,000, a real model's size: the embedding and the LM head are then 84% of the parameters, and rows 1-4's
logits, their fp32 copy and the gradients of each, are the largest transient of their steps; rows 5-6 take
memengine.causal_lm_loss's fused linear + cross-entropy, which never holds them. At this size memengine's
whole-step peak is its optimizer step, whose temporaries (two fp32 copies of the largest parameter inside
torch's AdamW) exceed one micro-batch's activations: the default budget of row 6 then falls back to the
smallest feasible one, and the notes say so; --vocab 256 gives the small-vocabulary model where the blocks'
activations are the peak). Every row of a batch is a window of the
corpus of random length, padded (labels -100) to the sequence length, so micro-batches hold
different numbers of tokens: that is where "each micro-batch's mean / number of micro-batches"
(row 2) differs from the full batch's mean over its tokens (the oracle, rows 1, 4, 5, 6).

Measurements (one definition for every row):
  peak memory   the whole-step peak of one steady-state step (the last one, optimizer state
                present): the bytes of the tensors resident before the step (parameters, buffers,
                masters, optimizer state, the batch, memengine's gradient buffer) plus the peak of
                what the step allocates beyond them (memengine.segments.allocator_peak: the CUDA
                allocator's statistics, or the CPU allocator's events from the profiler). Broken
                down into parameters, gradients (a full gradient set in the row's gradient dtype),
                optimizer state (masters and AdamW's moments) and the rest of the peak (activations,
                the batch and temporaries, such as rows 1-3's fp32 copies of the gradients).
  step time     median over the steps between the first (gradient capture, planning) and the last
                (memory measurement); the rows take their steps in turn, round-robin with a rotating
                order, so a shared machine's drifts hit them alike. Ratios are to row 1.
  gradient error  ||g - g64|| / ||g64|| over all parameters, g the first step's gradient as the row's
                optimizer would see it, g64 the full-batch mean-token-loss gradient of the same
                initial weights and batch computed in fp64.
  budget        row 6's whole-step budget (Engine(budget=)): by default half of row 5's activations
                are kept, i.e. row 5's predicted whole-step peak minus half of its predicted
                activations; "P%" keeps P percent of them; or a size ("2GiB"). A default below the
                smallest feasible budget falls back to it (the notes say so); a given one raises
                BudgetTooSmall naming the minimum.
"""

import copy
import dataclasses
import functools
import math
import pathlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import memengine
from memengine.engine import Engine, causal_lm_loss, split_batch
from memengine.engine.step_memory import human_bytes, resident_tensors, storage_bytes
from memengine.models import GPT
from memengine.segments import activation_share, parse_bytes, repeated_blocks
from memengine.segments.allocator_peak import peak_extra_bytes

BYTE_VALUES = 256  # the tokens are bytes: ids 0-255 of the model's vocabulary
DEFAULT_VOCAB = 32000  # a real model's vocabulary: the loss's memory shows in the table
IGNORE_INDEX = -100
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODELS = ("gpt", "gpt2", "llama")
DEFAULT_BUDGET = "50%"
MIN_STEPS = 3  # the first captures the gradient, the last measures memory, the ones between are timed
PEAK_PREDICTION_TOLERANCE = 0.05
# --quick: the default model with half the batch and fewer steps. Both keep the parameters' memory
# (2 bytes of bf16 gradient per parameter) larger than one micro-batch's activations, the regime of
# fine-tuning a large model with small micro-batches that memengine is for: with activations that
# dominate instead, row 5's fp32 gradient buffer (4 bytes per parameter) outweighs row 2's bf16 .grad
# plus its fp32 copy at the optimizer step, and only row 6 (recomputation) is below row 2.
QUICK = {"batch": 4, "steps": 4}

METHODS = [
    ("pytorch-full-batch", "PyTorch, full batch"),
    ("pytorch-accumulation", "PyTorch, accumulation (bf16 .grad)"),
    ("pytorch-checkpointing", "PyTorch, accumulation + checkpoint"),
    ("pytorch-fp32-grads", "PyTorch, fp32 grad accumulation"),
    ("memengine", "memengine Engine"),
    ("memengine-budget", "memengine Engine(budget)"),
]


class BudgetTooSmall(ValueError):
    """A given budget is below the smallest feasible whole-step peak (.minimum, in bytes)."""

    def __init__(self, budget, minimum):
        self.budget, self.minimum = budget, minimum
        super().__init__(
            f"{human_bytes(budget)} ({budget:,} bytes) is below the smallest feasible whole-step budget for this model "
            f"and batch: {human_bytes(minimum)} ({minimum:,} bytes)"
        )


@dataclasses.dataclass
class DemoConfig:
    device: str = "cpu"
    dtype: str = "bf16"
    model: str = "gpt"
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    seq: int = 256
    vocab: int = DEFAULT_VOCAB
    batch: int = 8
    micro_batch: int = 2
    steps: int = 10
    budget: str = DEFAULT_BUDGET  # "P%" of row 5's activations kept, or a size such as "2GiB"
    lr: float = 2e-3
    seed: int = 0

    def check(self):
        """Raises ValueError("--flag: ...") for a value the demo cannot run."""
        problems = [
            (self.layers < 2, "--layers", f"must be at least 2 (the planner needs repeated blocks), got {self.layers}"),
            (self.hidden < 1, "--hidden", f"must be positive, got {self.hidden}"),
            (self.heads < 1, "--heads", f"must be positive, got {self.heads}"),
            (self.seq < 2, "--seq", f"must be at least 2 (a token and the next one), got {self.seq}"),
            (
                self.vocab < BYTE_VALUES,
                "--vocab",
                f"must be at least {BYTE_VALUES} (the tokens are bytes), got {self.vocab}",
            ),
            (self.batch < 1, "--batch", f"must be positive, got {self.batch}"),
            (self.micro_batch < 1, "--micro-batch", f"must be positive, got {self.micro_batch}"),
            (self.steps < MIN_STEPS, "--steps", f"must be at least {MIN_STEPS}, got {self.steps}"),
            (not self.lr > 0, "--lr", f"must be positive, got {self.lr}"),
        ]
        for failed, flag, message in problems:
            if failed:
                raise ValueError(f"{flag} {message}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.micro_batch > self.batch:
            raise ValueError(f"--micro-batch {self.micro_batch} is larger than --batch {self.batch}")
        if self.batch // self.micro_batch < 2:
            raise ValueError(f"--batch {self.batch} must hold at least two micro-batches of --micro-batch")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here; use --device cpu")
        parse_budget(self.budget)
        if self.model != "gpt":
            try:
                import transformers  # noqa: F401
            except ImportError:
                raise ValueError(
                    f"--model {self.model} builds a Hugging Face model and needs transformers (pip install "
                    "transformers); --model gpt needs nothing more"
                ) from None


def parse_budget(text):
    """("fraction", 0.4) for "40%", ("bytes", n) for a size; ValueError naming --budget otherwise."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            return "fraction", activation_share(text)
        except ValueError:
            raise ValueError(f"--budget {text}: a percentage of row 5's activations must be in (0, 100]") from None
    try:
        count = parse_bytes(text)
    except ValueError:
        raise ValueError(f"--budget {text}: give a size such as 2GiB or 300MiB, or a percentage such as 40%") from None
    if count <= 0:
        raise ValueError(f"--budget {text}: must be positive")
    return "bytes", count


@dataclasses.dataclass
class MethodResult:
    name: str
    label: str
    peak_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    other_bytes: int  # peak minus the three above: activations, the batch, temporaries
    step_time_s: float
    step_time_ratio: float  # to row 1
    tokens_per_s: float
    tokens_per_s_ratio: float  # to row 1
    gradient_error: float
    losses: list  # mean token loss of each step
    predicted_peak_bytes: int = None  # memengine rows: the Engine's prediction for a steady-state step
    plan: str = None  # memengine rows: the recompute plan over the blocks
    budget_bytes: int = None  # row 6

    @property
    def first_loss(self):
        return self.losses[0]

    @property
    def final_loss(self):
        return self.losses[-1]

    @property
    def prediction_error(self):
        """(measured - predicted) / predicted, or None."""
        if self.predicted_peak_bytes is None:
            return None
        return (self.peak_bytes - self.predicted_peak_bytes) / self.predicted_peak_bytes


@dataclasses.dataclass
class DemoResults:
    config: dict
    environment: dict
    corpus_bytes: int
    tokens_per_step: float  # mean loss tokens of a step
    parameters: int  # number of trainable parameters
    budget_bytes: int
    budget_rule: str  # how the budget was chosen, in words
    smallest_feasible_budget: int
    no_recompute_peak: int
    methods: list  # MethodResult, rows 1-6
    notes: list
    claims: list = dataclasses.field(default_factory=list)  # (statement, holds)

    def method(self, name):
        return next(m for m in self.methods if m.name == name)

    def to_dict(self):
        data = dataclasses.asdict(self)
        for row, method in zip(data["methods"], self.methods, strict=True):
            row.update(
                first_loss=method.first_loss, final_loss=method.final_loss, prediction_error=method.prediction_error
            )
        data["claims"] = [{"claim": text, "holds": holds} for text, holds in self.claims]
        return data


def corpus():
    """The embedded corpus: memengine's own Python sources, concatenated in path order."""
    root = pathlib.Path(memengine.__file__).resolve().parent
    return b"\n".join(path.read_bytes() for path in sorted(root.rglob("*.py")))


def make_batches(data, config, count, device):
    """`count` batches {"input_ids", "labels"} of config.batch rows: windows of the corpus of random
    lengths in [seq/4, seq], padded to seq (input 0, label -100)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    corpus_tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if corpus_tokens.numel() <= config.seq:
        raise ValueError(f"--seq {config.seq} is longer than the embedded corpus ({corpus_tokens.numel()} bytes)")
    batches = []
    for _ in range(count):
        starts = torch.randint(0, corpus_tokens.numel() - config.seq, (config.batch,), generator=generator)
        lengths = torch.randint(max(2, config.seq // 4), config.seq + 1, (config.batch,), generator=generator)
        input_ids = torch.stack([corpus_tokens[s : s + config.seq] for s in starts.tolist()]).long()
        padding = torch.arange(config.seq)[None, :] >= lengths[:, None]
        labels = input_ids.masked_fill(padding, IGNORE_INDEX)
        batches.append({"input_ids": input_ids.masked_fill(padding, 0).to(device), "labels": labels.to(device)})
    return batches


def token_count(batch):
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class InputIdsGPT(GPT):
    """The GPT fixture called as Hugging Face models are: model(input_ids=...) -> logits (and its final hidden
    states the same way, for memengine.causal_lm_loss's fused loss)."""

    def hidden_states(self, input_ids):
        return super().hidden_states(input_ids)

    def forward(self, input_ids):
        return super().forward(input_ids)


def build_model(config):
    """The model in the config's dtype and device, initialised from config.seed (dropout off)."""
    torch.manual_seed(config.seed)
    if config.model == "gpt":
        model = InputIdsGPT(config.vocab, config.hidden, config.layers, config.heads, config.seq)
    elif config.model == "gpt2":
        import transformers

        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=config.vocab,
                n_positions=config.seq,
                n_embd=config.hidden,
                n_layer=config.layers,
                n_head=config.heads,
                bos_token_id=0,  # GPT-2's 50256 may be outside --vocab
                eos_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                use_cache=False,
            )
        )
    else:
        import transformers

        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=config.vocab,
                hidden_size=config.hidden,
                intermediate_size=4 * config.hidden,
                num_hidden_layers=config.layers,
                num_attention_heads=config.heads,
                num_key_value_heads=config.heads,
                max_position_embeddings=config.seq,
                use_cache=False,
            )
        )
    return model.to(device=config.device, dtype=DTYPES[config.dtype]).train()


def oracle_gradient(template, batches_of_step):
    """{name: fp64 gradient} of the full batch's mean token loss, from fp64 copies of the weights."""
    oracle = copy.deepcopy(template).to(torch.float64)
    total = token_count(batches_of_step)
    for micro_batch in split_batch(batches_of_step, 1):
        logits = oracle(input_ids=micro_batch["input_ids"])
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            micro_batch["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        (loss / total).backward()
    return {name: p.grad for name, p in oracle.named_parameters()}


def relative_error(gradients, oracle):
    """||g - g64|| / ||g64|| over every parameter; `gradients` maps names to tensors."""
    difference = sum(float((gradients[n].to(torch.float64) - g).square().sum()) for n, g in oracle.items())
    return math.sqrt(difference / sum(float(g.square().sum()) for g in oracle.values()))


def first_step_error(method, batch, oracle):
    """(result of method.step(batch), relative error of the gradient its optimizer steps with)."""
    errors = []
    result = method.step(batch, on_gradient=lambda gradients: errors.append(relative_error(gradients, oracle)))
    return result, errors[0]


def measured_peak(method, batch, device):
    """(result of method.step(batch), its whole-step peak in bytes): the storages resident before the
    step plus the allocator's peak of what the step allocates beyond them."""
    resident = storage_bytes(method.resident(batch), device)
    outcome = []
    extra = peak_extra_bytes(lambda: outcome.append(method.step(batch)), device)
    return outcome[0], resident + extra


def timed(fn, device):
    """(result, seconds) of fn(), with the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


class MasterWeightAdamW:
    """torch.optim.AdamW over fp32 master weights of the low-precision parameters (fp32 parameters are
    their own masters): step() hands the masters the parameters' gradients (cast to fp32, all at once,
    when they are not fp32 already), steps, copies the masters back, and drops the gradients."""

    def __init__(self, params, lr):
        self.pairs = [(p, p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float())) for p in params]
        self.optimizer = torch.optim.AdamW([master for _, master in self.pairs], lr=lr)

    @torch.no_grad()
    def step(self):
        for p, master in self.pairs:
            if master is not p:
                master.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.optimizer.step()
        for p, master in self.pairs:
            if master is not p:
                p.copy_(master)
                master.grad = None
            p.grad = None

    def masters(self):
        return [master for p, master in self.pairs if master is not p]

    def state_tensors(self):
        return [value for per_param in self.optimizer.state.values() for value in per_param.values()]


class PyTorchMethod:
    """Rows 1-4: a plain PyTorch training step (see the module docstring)."""

    def __init__(self, name, model, config):
        self.name, self.model, self.config = name, model, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.accumulate = name != "pytorch-full-batch"
        self.token_normalised = name in ("pytorch-full-batch", "pytorch-fp32-grads")
        if name == "pytorch-checkpointing":
            for block in repeated_blocks(model):
                block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
        self.gradient_dtype = self.params[0].dtype
        if name == "pytorch-fp32-grads":
            for p in self.params:
                p.grad_dtype = torch.float32  # autograd accumulates the micro-batches into fp32 .grad
            self.gradient_dtype = torch.float32
        self.optimizer = MasterWeightAdamW(self.params, config.lr)

    def step(self, batch, on_gradient=None):
        """One optimizer step; returns (summed loss, tokens) as host numbers."""
        micro_batches = split_batch(batch, self.config.micro_batch) if self.accumulate else [batch]
        total_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # stays on the device
        loss_total = torch.zeros((), dtype=torch.float64, device=total_tokens.device)
        for micro_batch in micro_batches:
            # The usual recipe's loss, through the logits (never memengine's fused loss, whatever the model).
            loss_sum, tokens = causal_lm_loss(self.model, micro_batch, fused=False)
            if self.token_normalised:
                loss = loss_sum / total_tokens
            else:  # each micro-batch's mean, over the number of micro-batches, as the articles do it
                loss = loss_sum / tokens / len(micro_batches)
            loss.backward()
            loss_total += loss_sum.detach().to(torch.float64)
        if on_gradient is not None:
            on_gradient({name: p.grad for name, p in self.model.named_parameters() if p.requires_grad})
        self.optimizer.step()
        return float(loss_total), int(total_tokens)

    def resident(self, batch):
        return [*self.model.parameters(), *self.model.buffers(), *self.optimizer.masters()] + [
            self.optimizer.state_tensors(),
            batch,
        ]

    def breakdown(self, device):
        """(parameter, gradient, optimizer) bytes: a gradient set is one tensor per parameter in its gradient dtype."""
        parameters = storage_bytes(self.params, device)
        gradients = sum(p.numel() for p in self.params) * self.gradient_dtype.itemsize
        optimizer = storage_bytes([self.optimizer.masters(), self.optimizer.state_tensors()], device)
        return parameters, gradients, optimizer


class EngineMethod:
    """Rows 5-6: memengine.Engine over micro-batches, memengine.causal_lm_loss (summed, token-normalised)."""

    def __init__(self, name, model, config, budget=None):
        self.name, self.model, self.config = name, model, config
        self.engine = Engine(
            model,
            functools.partial(torch.optim.AdamW, lr=config.lr),
            micro_batch_size=config.micro_batch,
            budget=budget,
        )
        self._on_gradient = None
        self.engine.optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer, args, kwargs):
        # The buffer is normalised by the token count by now: this is the gradient the optimizer steps with.
        if self._on_gradient is not None:
            self._on_gradient({name: p.main_grad for name, p in self.model.named_parameters() if p.requires_grad})

    def step(self, batch, on_gradient=None):
        self._on_gradient = on_gradient
        try:
            stats = self.engine.step(batch)
        finally:
            self._on_gradient = None
        tokens = float(stats["tokens"])
        return float(stats["loss"]) * tokens, tokens

    def resident(self, batch):
        return resident_tensors(self.model, self.engine.buffer, self.engine.optimizer, batch)

    def breakdown(self, device):
        optimizer = self.engine.optimizer
        state = [value for per_param in optimizer.state.values() for value in per_param.values()]
        masters = [optimizer.master_data] if optimizer.master_data is not None else []
        parameters = storage_bytes(list(self.model.parameters()), device)
        return parameters, storage_bytes([self.engine.buffer.data], device), storage_bytes([masters, state], device)


def _default_progress(description, advance=1):
    pass


def run(config, progress=_default_progress):
    """Runs the demo; returns DemoResults. progress(description, advance) is called as work is
    done: total units are progress_units(config). Raises ValueError naming the flag for a bad config
    and BudgetTooSmall for a given budget below the smallest feasible one."""
    config.check()
    device = torch.device(config.device)
    data = corpus()
    batches = make_batches(data, config, config.steps, device)
    template = build_model(config)
    notes = []

    # First (it takes a second), so that a budget below the smallest feasible is refused at once:
    # row 5's prediction (no recomputation) on the first batch sets row 6's budget.
    progress("planning row 6", 0)
    row5 = EngineMethod("memengine", copy.deepcopy(template), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row5_report = row5.engine.memory_report(batches[0])
    budget, rule = choose_budget(config.budget, row5_report, notes)
    progress("planning row 6", 1)

    progress("fp64 oracle gradient", 0)
    oracle = oracle_gradient(template, batches[0])
    progress("fp64 oracle gradient", 1)

    methods = [PyTorchMethod(name, copy.deepcopy(template), config) for name, _ in METHODS[:4]]
    methods.append(row5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row6 = EngineMethod("memengine-budget", copy.deepcopy(template), config, budget=budget)
        methods.append(row6)

        gradient_errors, losses, times, peaks = {}, {m.name: [] for m in methods}, {m.name: [] for m in methods}, {}
        for step, batch in enumerate(batches):
            rotation = step % len(methods)
            for method in methods[rotation:] + methods[:rotation]:
                progress(f"step {step + 1}/{config.steps} {method.name}", 0)
                if step == 0:
                    (loss_sum, tokens), gradient_errors[method.name] = first_step_error(method, batch, oracle)
                elif step == len(batches) - 1:
                    (loss_sum, tokens), peaks[method.name] = measured_peak(method, batch, device)
                else:
                    (loss_sum, tokens), seconds = timed(functools.partial(method.step, batch), device)
                    times[method.name].append(seconds)
                losses[method.name].append(loss_sum / tokens)
                progress(f"step {step + 1}/{config.steps} {method.name}", 1)
    notes += [str(w.message) for w in caught]

    tokens_per_step = statistics.mean(token_count(b) for b in batches[1:-1])
    row6_report = row6.engine.memory_report()
    results = []
    baseline_time = None
    for (name, label), method in zip(METHODS, methods, strict=True):
        parameters, gradients, optimizer = method.breakdown(device)
        seconds = statistics.median(times[name])
        baseline_time = baseline_time or seconds
        result = MethodResult(
            name=name,
            label=label,
            peak_bytes=peaks[name],
            parameter_bytes=parameters,
            gradient_bytes=gradients,
            optimizer_bytes=optimizer,
            other_bytes=peaks[name] - parameters - gradients - optimizer,
            step_time_s=seconds,
            step_time_ratio=seconds / baseline_time,
            tokens_per_s=tokens_per_step / seconds,
            tokens_per_s_ratio=baseline_time / seconds,
            gradient_error=gradient_errors[name],
            losses=losses[name],
        )
        if isinstance(method, EngineMethod):
            report = row5_report if name == "memengine" else row6_report
            result.predicted_peak_bytes = report.predicted_peak
            result.plan = report.plan
            result.budget_bytes = report.budget
        results.append(result)
    demo = DemoResults(
        config=dataclasses.asdict(config),
        environment=environment(device),
        corpus_bytes=len(data),
        tokens_per_step=tokens_per_step,
        parameters=sum(p.numel() for p in template.parameters()),
        budget_bytes=budget,
        budget_rule=rule,
        smallest_feasible_budget=row5_report.smallest_feasible_budget,
        no_recompute_peak=row5_report.no_recompute_peak,
        methods=results,
        notes=notes,
    )
    demo.claims = claims(demo)
    return demo


def progress_units(config):
    """How many units run() reports through progress(): oracle, planning, then each step of each row."""
    return 2 + config.steps * len(METHODS)


def choose_budget(text, row5_report, notes):
    """(row 6's whole-step budget in bytes, the rule in words), from --budget and row 5's prediction."""
    kind, value = parse_budget(text)
    smallest = row5_report.smallest_feasible_budget
    if kind == "bytes":
        if value < smallest:
            raise BudgetTooSmall(value, smallest)
        return value, f"--budget {text}"
    activations = row5_report.non_repeated_activations + row5_report.block_activations
    budget = int(row5_report.predicted_peak - (1 - value) * activations)
    rule = f"row 5's predicted peak with {value:.0%} of its activations ({human_bytes(activations)})"
    if budget < smallest:
        if text != DEFAULT_BUDGET:
            raise BudgetTooSmall(budget, smallest)
        notes.append(
            f"the default budget ({rule}: {human_bytes(budget)}) is below the smallest feasible, "
            f"{human_bytes(smallest)}; row 6 uses that instead"
        )
        return smallest, f"the smallest feasible budget (the default, {rule}, is below it)"
    return budget, rule


def claims(demo):
    """The statements the table supports, each checked on this run's numbers: [(statement, holds)]."""
    row = {m.name: m for m in demo.methods}
    ours = [row["memengine"], row["memengine-budget"]]
    theirs = [row["pytorch-accumulation"], row["pytorch-fp32-grads"]]
    budgeted = row["memengine-budget"]
    error = budgeted.prediction_error
    return [
        (
            "memengine's peaks (rows 5, 6) are below PyTorch accumulation's (rows 2, 4)",
            max(m.peak_bytes for m in ours) < min(m.peak_bytes for m in theirs),
        ),
        (
            f"row 6's measured peak ({human_bytes(budgeted.peak_bytes)}) is within its budget "
            f"({human_bytes(budgeted.budget_bytes)})",
            budgeted.peak_bytes <= budgeted.budget_bytes,
        ),
        (
            f"row 6's measured peak is within {PEAK_PREDICTION_TOLERANCE:.0%} of the prediction ({error:+.1%})",
            abs(error) <= PEAK_PREDICTION_TOLERANCE,
        ),
        (
            "memengine's gradient error (row 5) is at most fp32 accumulation's (row 4) and below bf16 accumulation's "
            "(row 2)",
            row["memengine"].gradient_error <= row["pytorch-fp32-grads"].gradient_error
            and row["memengine"].gradient_error < row["pytorch-accumulation"].gradient_error,
        ),
        ("every method's loss decreased", all(m.final_loss < m.first_loss for m in demo.methods)),
    ]


def cpu_name():
    """The CPU's model name (the demo's time ratios depend on it: AVX512-BF16, AMX and core counts differ)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def environment(device):
    return {
        "memengine": memengine.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}",
        "threads": torch.get_num_threads(),
    }
