"""Whole-step memory: what one training step holds on the model's device at its peak, predicted
before the step and measured around it, and the recompute plan that makes it fit a budget.

The whole-step peak is the most bytes allocated on the model's device at any moment of one
optimizer step (engine.step(batch)): everything live (parameters and buffers, the GradBuffer,
the fp32 masters, the optimizer state, the batch, the micro-batches' activations and their
gradients, the activations of the layers that are not repeated: embeddings, final norm, LM head,
logits and loss) plus temporaries, those of the optimizer's own step included.

Measured (measure_step_peak) on CUDA by the caching allocator's max_memory_allocated, on CPU as
the bytes of the distinct storages resident before the step that the step can see (parameters,
buffers, gradient buffer, masters, optimizer state, batch) plus the peak of what the profiler's
allocator events add during it (segments.allocator_peak.peak_extra_bytes).

Predicted (plan_step_memory) as
    resident bytes (exact, from tensor sizes)
  + the optimizer state (exact when it exists; before the first step, from a step of an optimizer
    of the same type and options over fake copies of the masters, which also gives the step's
    temporaries; nothing real is touched)
  + the larger of one micro-batch's forward and backward and the optimizer step's temporaries.
One micro-batch's forward and backward is cut in five phases by hooks on the repeated blocks:
before the blocks (embeddings), the blocks' forward, the head (final norm, LM head, logits, loss
and their backward), the blocks' backward, after the blocks (embeddings' backward). The phases
outside the blocks are measured once, on the sample micro-batch, with every block recomputed (the
least memory a plan can take, so that planning itself stays within any feasible budget); the
blocks' phases follow the memory model of memengine.segments.model (simulate) on top of what the
layers before them keep; the head phase holds what the blocks store under the plan.
"""

import dataclasses
import inspect
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten

from memengine.segments import SegmentHandle, activation_share, segment
from memengine.segments.allocator_peak import peak_extra_bytes
from memengine.segments.live_bytes import LiveBytes
from memengine.segments.model import Segment, segment_profile, simulate
from memengine.segments.profile import cuda_devices, profile
from memengine.segments.solve import smallest_feasible_budget, solve
from memengine.segments.state_protection import NoStateUpdates

STEP_SCALARS = 4  # one-element tensors of up to 8 bytes the Engine's step keeps through a micro-batch
CUDA_ALLOCATION_GRANULE = 512  # the CUDA caching allocator's smallest block


def human_bytes(count):
    """1234567 -> '1.18 MiB' (binary units, as parse_bytes reads them)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def storage_bytes(tensors, device):
    """Bytes of the distinct storages of `tensors` (nested containers allowed) on `device`."""
    seen = {}
    for t in tree_flatten(tensors)[0]:
        if isinstance(t, torch.Tensor) and t.device == device and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def resident_tensors(model, buffer, optimizer, batch=None):
    """The tensors a step sees that exist before it: parameters, buffers, the gradient buffer,
    the masters, the optimizer state and the batch."""
    state = [value for per_param in optimizer.state.values() for value in per_param.values()]
    masters = [master for _, master in optimizer.masters]
    return [*model.parameters(), *model.buffers(), buffer.data, *masters, *tree_flatten(state)[0], batch]


def measure_step_peak(step, device, resident):
    """(result of step(), whole-step peak in bytes on `device`). resident: the tensors alive
    before the step that it can see (resident_tensors); on CPU their storages' bytes are added to
    the profiler's peak of what the step allocates, on CUDA the allocator's max_memory_allocated
    already counts them (and anything else on the device)."""
    result = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result.append(step())
        torch.cuda.synchronize(device)
        return result[0], torch.cuda.max_memory_allocated(device)
    base = storage_bytes(resident, device)
    extra = peak_extra_bytes(lambda: result.append(step()), device)
    return result[0], base + extra


@dataclasses.dataclass
class MicroBatchPhases:
    """Measured phases of one micro-batch's forward and backward with every block recomputed, in
    bytes above what was live before it (see the module docstring)."""

    before_blocks_peak: int  # embeddings' forward
    blocks_base: int  # what the layers before the blocks keep through the blocks' phases
    head_peak: int  # head forward, loss and head backward, with every block recomputed
    after_blocks_peak: int  # embeddings' backward
    measured_blocks_peak: int  # the blocks' phases, measured (checks blocks_base + simulate)
    planning_peak: int  # this measurement and the blocks' profiling


@dataclasses.dataclass
class StepMemoryPlan:
    """A plan for the blocks with the whole-step prediction that goes with it. Byte counts on the
    model's device; `predicted_peak` is a step once the optimizer state exists,
    `predicted_first_step_peak` the first step (no state during its micro-batches)."""

    budget: int  # None: no budget
    plan: list  # memengine.plan.Segment list over the blocks
    chain: object  # the blocks' profile (memengine.plan.Chain)
    phases: MicroBatchPhases
    parameters: int
    gradient_buffer: int
    masters: int
    optimizer_state: int
    batch: int
    other_resident: int  # module buffers and anything else resident that is none of the above
    non_repeated_activations: int  # of the micro-batch peak, the part outside the blocks' model
    block_activations: int  # of the micro-batch peak, the blocks' part under the plan
    optimizer_step_temporaries: int
    smallest_feasible_budget: int
    no_recompute_peak: int
    handle: SegmentHandle = None  # the plan applied (None when nothing is recomputed)

    @property
    def resident(self):
        return self.parameters + self.gradient_buffer + self.masters + self.batch + self.other_resident

    @property
    def micro_batch_peak(self):
        return self.non_repeated_activations + self.block_activations

    @property
    def predicted_peak(self):
        return self.resident + self.optimizer_state + max(self.micro_batch_peak, self.optimizer_step_temporaries)

    @property
    def predicted_first_step_peak(self):
        """The first step: no optimizer state during its micro-batches, and the planning before them."""
        optimizer_step = self.optimizer_state + self.optimizer_step_temporaries
        return self.resident + max(self.micro_batch_peak, optimizer_step, self.phases.planning_peak)

    @property
    def recomputes(self):
        return any(s.policy != "keep" for s in self.plan)

    def plan_summary(self):
        """'keep 0-5' or 'recompute 0-1, keep 2-5': the plan, segment by segment."""
        parts = []
        for s in self.plan:
            blocks = f"{s.start}-{s.end - 1}" if s.end - s.start > 1 else str(s.start)
            parts.append(f"{s.policy} {blocks}")
        return ", ".join(parts)


@dataclasses.dataclass
class MemoryReport:
    """engine.memory_report(): the whole-step breakdown, predicted, and the measured peak of the
    last measured step. str() is a table. The breakdown rows sum to predicted_peak: the
    micro-batch rows and optimizer_step_temporaries are not live together, so the one that is
    smaller is reported as "not at the peak"."""

    parameters: int
    gradient_buffer: int
    masters: int
    optimizer_state: int
    batch: int
    other_resident: int
    non_repeated_activations: int
    block_activations: int
    optimizer_step_temporaries: int
    predicted_peak: int
    predicted_first_step_peak: int
    budget: int
    smallest_feasible_budget: int
    no_recompute_peak: int
    plan: str
    measured_peak: int = None
    measured_step: int = None  # which step (1-based) measured_peak is from
    loss: str = None  # which loss path the last step took (engine.losses.loss_path), when known

    @classmethod
    def from_plan(cls, planned, measured_peak=None, measured_step=None, loss=None):
        """The report of a StepMemoryPlan, with the measured peak of a step when there is one."""
        own = ("plan", "measured_peak", "measured_step", "loss")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in own]
        values = {name: getattr(planned, name) for name in names}
        return cls(
            **values, plan=planned.plan_summary(), measured_peak=measured_peak, measured_step=measured_step, loss=loss
        )

    def breakdown(self):
        """(name, bytes) rows that sum to predicted_peak (the micro-batch's forward/backward and
        the optimizer step's temporaries are not alive at once: only the larger counts)."""
        micro = self.non_repeated_activations + self.block_activations
        at_micro = micro >= self.optimizer_step_temporaries
        return [
            ("parameters", self.parameters),
            ("gradient buffer", self.gradient_buffer),
            ("fp32 masters", self.masters),
            ("optimizer state", self.optimizer_state),
            ("batch", self.batch),
            ("other resident (module buffers)", self.other_resident),
            ("non-repeated activations", self.non_repeated_activations if at_micro else 0),
            ("block activations (plan)", self.block_activations if at_micro else 0),
            ("optimizer step temporaries", 0 if at_micro else self.optimizer_step_temporaries),
        ]

    def __str__(self):
        rows = [f"{'whole-step memory':<34} {'bytes':>15} {'':>11}"]
        at_peak = dict(self.breakdown())
        for name, value in self.breakdown():
            actual = {
                "non-repeated activations": self.non_repeated_activations,
                "block activations (plan)": self.block_activations,
                "optimizer step temporaries": self.optimizer_step_temporaries,
            }.get(name, value)
            note = "" if at_peak[name] == actual else "  (not alive at the peak)"
            rows.append(f"{name:<34} {actual:>15,} {human_bytes(actual):>11}{note}")
        rows.append(f"{'predicted peak':<34} {self.predicted_peak:>15,} {human_bytes(self.predicted_peak):>11}")
        first = self.predicted_first_step_peak
        rows.append(f"{'predicted peak, first step':<34} {first:>15,} {human_bytes(first):>11}")
        if self.measured_peak is not None:
            predicted = first if self.measured_step == 1 else self.predicted_peak
            error = (predicted - self.measured_peak) / self.measured_peak * 100
            label = f"measured peak (step {self.measured_step})"
            rows.append(f"{label:<34} {self.measured_peak:>15,} {human_bytes(self.measured_peak):>11}  {error:+.1f} %")
        if self.budget is not None:
            rows.append(f"{'budget':<34} {self.budget:>15,} {human_bytes(self.budget):>11}")
        for name, value in (
            ("smallest feasible", self.smallest_feasible_budget),
            ("no recompute", self.no_recompute_peak),
        ):
            rows.append(f"{name:<34} {value:>15,} {human_bytes(value):>11}")
        rows.append(f"plan: {self.plan}")
        if self.loss is not None:
            rows.append(f"loss: {self.loss}")
        return "\n".join(rows)


# The Engine's own small tensors during its optimizer step (the token count and its inverse, the norm statistics,
# the agreement flags): 41 bytes on the CPU allocator in the demo's step, a few 512-byte blocks on CUDA's. Without
# them a step planned at exactly its smallest feasible budget measured 41 bytes above it.
STEP_BOOKKEEPING_BYTES = 4096


def _unwrapped_step(optimizer):
    """The optimizer class's step without torch's hook wrapper: a prediction must not run the
    user's (or memengine's) global step hooks."""
    step = type(optimizer).step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def predict_optimizer_step(optimizer, device):
    """(state bytes, step temporaries) on `device` of one step of `optimizer` (a MasterOptimizer):
    an optimizer of the wrapped one's type and options steps fake copies of the masters (with
    fake gradients) under FakeTensorMode, counted by LiveBytes: nothing real is allocated, read or
    changed (parameters, state, random number generators). When the real state exists, its bytes
    are taken as they are."""
    wrapped = optimizer.optimizer
    mode = FakeTensorMode()
    fakes = {}

    def fake(t):
        if id(t) not in fakes:
            copy = mode.from_tensor(t.detach())
            fakes[id(t)] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if t.requires_grad else copy
            if t.requires_grad:
                fakes[id(t)].grad = mode.from_tensor(t.detach())
        return fakes[id(t)]

    groups = []
    for group in wrapped.param_groups:
        options = {k: (fake(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items() if k != "params"}
        groups.append({**options, "params": [fake(p) for p in group["params"]]})
    accepted = inspect.signature(type(wrapped).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    defaults = {k: v for k, v in wrapped.defaults.items() if (takes_any or k in accepted) and k != "params"}
    defaults = {k: (fake(v) if isinstance(v, torch.Tensor) else v) for k, v in defaults.items()}
    with mode:
        twin = type(wrapped)(groups, **defaults)
        with LiveBytes() as live:
            _unwrapped_step(twin)(twin)
            temporaries = live.peak - live.current  # what the step made and dropped
    state = [value for per_param in twin.state.values() for value in per_param.values()]
    predicted_state = sum(
        t.untyped_storage().nbytes()
        for t in tree_flatten(state)[0]
        if isinstance(t, torch.Tensor) and t.device == device
    )
    if optimizer.state:  # the real state exists: exact
        real = [value for per_param in optimizer.state.values() for value in per_param.values()]
        predicted_state = storage_bytes(real, device)
    return predicted_state, max(temporaries, 0)


def measure_micro_batch(blocks, sample, buffer):
    """(chain, MicroBatchPhases): runs sample() (one micro-batch's loss) forward and backward
    with every block recomputed, measuring its phases with LiveBytes, then profiles the blocks
    (memengine.plan.profile) with the arguments the model gave the first block. Module buffers
    (BatchNorm statistics) are protected during the forward and the random number generators
    restored; the gradients land in the GradBuffer, whose window is reopened afterwards (so the
    step's first micro-batch overwrites them): call this before a step's first micro-batch. Ready
    hooks of the buffer fire as in any backward."""
    handle = segment(blocks, plan=[Segment(i, i + 1, "recompute") for i in range(len(blocks))])
    marks = []  # (phase name, window peak, current) at the end of each phase
    first_call = []  # the first block's (args, kwargs), to profile the blocks with
    inputs_without_grad = []  # set when the first block's input does not require grad
    live = LiveBytes()

    def end_phase(name):
        marks.append((name, live.window_peak, live.current))
        live.mark()

    def gradient_reached(name):
        def hook(gradient):
            end_phase(name)

        return hook

    def blocks_start(module, args, kwargs):
        end_phase("before blocks")
        first_call.append((args, kwargs))
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args[0].register_hook(gradient_reached("blocks backward"))
        else:  # a frozen embedding (LoRA, adapters): no gradient leaves the blocks, their backward ends the step's
            inputs_without_grad.append(True)

    def blocks_end(module, args, kwargs, output):
        end_phase("blocks forward")
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(gradient_reached("head"))

    hooks = [
        blocks[0].register_forward_pre_hook(blocks_start, with_kwargs=True),
        blocks[-1].register_forward_hook(blocks_end, with_kwargs=True),
    ]
    tensors = [t for block in blocks for t in [*block.parameters(), *block.buffers()]]
    devices = [device.index for device in cuda_devices(tensors)]
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"), live:
            with NoStateUpdates():
                loss = sample()
            loss = loss[0] if isinstance(loss, (tuple, list)) else loss
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError(
                    "step memory: sample() must return (loss_sum, num_tokens) with loss_sum a one-element tensor "
                    "that requires grad"
                )
            loss.reshape(()).backward()
            del loss
            if inputs_without_grad:
                end_phase("blocks backward")
            end_phase("after blocks")
    finally:
        for hook in hooks:
            hook.remove()
        handle.remove()
        buffer.start_window()
    names = [name for name, _, _ in marks]
    if names != ["before blocks", "blocks forward", "head", "blocks backward", "after blocks"]:
        raise RuntimeError(
            f"step memory: the sample micro-batch's phases came out as {names}; the blocks must run once each, in "
            "order, with a hidden state that requires grad"
        )
    (args, kwargs), held = first_call.pop(), live.current  # what the recorded call keeps alive
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with LiveBytes() as profiling:
        chain = profile(blocks, *args, **kwargs)
    peaks = {name: peak for name, peak, _ in marks}
    phases = MicroBatchPhases(
        before_blocks_peak=peaks["before blocks"],
        blocks_base=marks[0][2] - chain.input_bytes[0],
        head_peak=peaks["head"],
        after_blocks_peak=peaks["after blocks"],
        measured_blocks_peak=max(peaks["blocks forward"], peaks["blocks backward"]),
        # plus the generator states of the recomputed blocks, which LiveBytes does not see
        planning_peak=max(live.peak, held + profiling.peak) + len(blocks) * checkpoint_state_bytes(buffer.data.device),
    )
    return chain, phases


def _stored(chain, plan):
    return sum(segment_profile(chain, s.start, s.end, s.policy)[0] for s in plan)


def checkpoint_state_bytes(device):
    """Bytes on `device` that each checkpointed block keeps for its recomputation besides its
    activations: the CPU random number generator's state on CPU (CUDA generators' states are
    host tensors, not on the device)."""
    return torch.get_rng_state().nbytes if device.type == "cpu" else 0


class MicroBatchModel:
    """Peak of one micro-batch's forward and backward under a plan of the blocks: the largest of
    the five phases (module docstring), from the measured phases (every block recomputed) and the
    blocks' chain."""

    def __init__(self, chain, phases, state_bytes_per_checkpoint, device):
        self.chain, self.phases, self.per_checkpoint = chain, phases, state_bytes_per_checkpoint
        # What the step keeps besides the sample's micro-batch: the loss and token totals (fp64), the
        # micro-batch's token count and its loss cast for the total; the CUDA allocator rounds each up.
        self.step_scalars = STEP_SCALARS * (CUDA_ALLOCATION_GRANULE if device.type == "cuda" else 8)
        # LiveBytes, which measured the phases, does not see the generator states (made without an op)
        self.measured_stored = _stored(chain, [Segment(i, i + 1, "recompute") for i in range(len(chain))])

    def _stored(self, plan):
        """What the blocks keep from their forward to their backward under `plan`."""
        checkpointed = sum(s.end - s.start for s in plan if s.policy != "keep")
        return _stored(self.chain, plan) + checkpointed * self.per_checkpoint

    def peak(self, plan):
        """(micro-batch peak, of which the blocks' activations under `plan`)."""
        extra = self._stored(plan) - _stored(self.chain, plan)  # checkpoint states
        blocks = simulate(self.chain, plan)["peak_bytes"] + extra
        head = self.phases.head_peak - self.measured_stored + self._stored(plan)
        peak = max(
            self.phases.before_blocks_peak, self.phases.blocks_base + blocks, head, self.phases.after_blocks_peak
        )
        return peak + self.step_scalars, blocks


def plan_step_memory(model, buffer, optimizer, blocks, budget, sample, batch=None, plan=None):
    """Plans one training step's memory: returns a StepMemoryPlan with the plan applied to
    `blocks` (.handle; None when nothing is recomputed) and the whole-step prediction.

    model: the patched model; buffer: its GradBuffer; optimizer: the MasterOptimizer over it;
    blocks: the repeated blocks (a list or nn.ModuleList the model calls in order); budget:
    whole-step bytes (module docstring), a share of the activations such as "50%" (the peak without
    recomputation less the other 50% of one micro-batch's activations) or None (no recompute, prediction only);
    sample: a
    zero-argument callable returning (loss_sum, num_tokens) of the step's largest micro-batch;
    batch: the step's batch (its bytes are resident through the step).

    plan: a plan (memengine.plan.Segment list) to apply instead of choosing one, e.g. the one a
    resumed run chose before (Engine.load_state_dict); the prediction is made for it.

    Call it before the step's first micro-batch: it runs the sample forward and backward once
    (with every block recomputed: the least memory) and reopens the buffer's accumulation window.
    Raises ValueError naming the smallest feasible budget (the planner's own, so a budget of that many
    bytes plans and steps) when `budget` is below it, after the one measuring forward and backward;
    the parameters and the optimizer are never changed. A budget at or above the no-recompute peak keeps every block."""
    blocks = list(blocks)
    device = buffer.data.device
    masters = optimizer.master_data
    parameters = storage_bytes(list(model.parameters()), device)
    gradient_buffer = storage_bytes([buffer.data], device)
    master_bytes = storage_bytes([masters], device) if masters is not None else 0
    batch_bytes = storage_bytes(batch, device)
    resident_without_state = storage_bytes([*model.parameters(), *model.buffers(), buffer.data, masters, batch], device)
    other = resident_without_state - parameters - gradient_buffer - master_bytes - batch_bytes
    state, step_temporaries = predict_optimizer_step(optimizer, device)
    step_temporaries += STEP_BOOKKEEPING_BYTES
    # Even when the resident bytes and the optimizer step alone exceed the budget, the micro-batch is measured
    # first, so that the minimum the error quotes is the feasible one (the planner's own), not a lower bound
    # that fails again when used (issue 19: "at least 60.63 MiB", then at 61 MiB "at least 62.69 MiB").
    chain, phases = measure_micro_batch(blocks, sample, buffer)
    micro_batch = MicroBatchModel(chain, phases, checkpoint_state_bytes(device), device)

    def whole(plan):
        return resident_without_state + state + max(micro_batch.peak(plan)[0], step_temporaries)

    # The first step also holds the planning itself (every block recomputed, then the profiling):
    # no budget below that can be kept, whatever the plan.
    planning = resident_without_state + phases.planning_peak
    keep = solve(chain, method="none")
    no_recompute_peak = max(whole(keep), planning)
    # The smallest whole-step peak: the blocks' smallest plan, or every block recomputed alone
    # (which stores the least for the head phase).
    least_blocks = smallest_feasible_budget(chain)
    candidates = [solve(chain, least_blocks), [Segment(i, i + 1, "recompute") for i in range(len(blocks))]]
    smallest = max(min(whole(candidate) for candidate in candidates), planning)
    share, described = activation_share(budget), None
    if share is not None:  # "50%": the peak without recomputation less the other half of the activations
        activations = micro_batch.peak(keep)[0]
        described = f"{budget} of the activations ({human_bytes(activations)})"
        budget = int(no_recompute_peak - (1 - share) * activations)
    if plan is not None:
        pass  # given: applied as it is
    elif budget is None or budget >= no_recompute_peak:
        plan = keep
        if budget is not None and share is None:
            warnings.warn(
                f"memengine: the whole-step budget of {budget:,} bytes ({human_bytes(budget)}) is at or above the "
                f"predicted peak without recomputation, {no_recompute_peak:,} bytes ({human_bytes(no_recompute_peak)}):"
                " nothing is recomputed",
                stacklevel=2,
            )
    elif budget < smallest:
        floor = resident_without_state + state + step_temporaries
        reason = "the resident bytes and the optimizer step alone" if floor > budget else "every plan of the blocks"
        raise _infeasible(budget, smallest, reason, described)
    else:
        plan = _largest_fitting_plan(chain, whole, budget, least_blocks, no_recompute_peak, candidates)
    handle = None
    if any(s.policy != "keep" for s in plan):
        handle = segment(blocks, plan=plan)
        handle.chain = chain
    micro, block_part = micro_batch.peak(plan)
    return StepMemoryPlan(
        budget=budget,
        plan=plan,
        chain=chain,
        phases=phases,
        parameters=parameters,
        gradient_buffer=gradient_buffer,
        masters=master_bytes,
        optimizer_state=state,
        batch=batch_bytes,
        other_resident=other,
        non_repeated_activations=micro - block_part,
        block_activations=block_part,
        optimizer_step_temporaries=step_temporaries,
        smallest_feasible_budget=smallest,
        no_recompute_peak=no_recompute_peak,
        handle=handle,
    )


def _largest_fitting_plan(chain, whole, budget, low, high, fallbacks):
    """The least-recompute plan whose whole-step peak fits `budget`: the blocks' optimal plan for
    the largest blocks' budget in [low, high] that fits (binary search), else a fallback that fits."""
    best = None
    while low <= high:
        middle = (low + high) // 2
        plan = solve(chain, middle)
        if whole(plan) <= budget:
            best, low = plan, middle + 1
        else:
            high = middle - 1
    if best is None:
        best = min(fallbacks, key=whole)
    return best


def _infeasible(budget, smallest, reason, described=None):
    described = "" if described is None else f", {described},"
    return ValueError(
        f"Engine: a whole-step memory budget of {budget:,} bytes ({human_bytes(budget)}){described} is too small "
        f"({reason} exceed it): the step needs at least {smallest:,} bytes ({human_bytes(smallest)}), its "
        "smallest feasible peak with every block recomputed as the planner would. The budget covers the whole "
        "step (parameters, gradient buffer, masters, optimizer state, batch, activations); raise it to at least "
        "that, or lower micro_batch_size"
    )
