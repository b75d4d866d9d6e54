"""Recompute planning for a chain of blocks: a memory model (simulate), an optimal solver and the
usual baselines.

A chain describes n blocks run one after the other. Per block i:
  input_bytes[i]        the tensor entering the block
  saved_bytes[i]        what autograd saves when the block runs with grad (parameters excluded;
                        its input included when the block saves it: input_saved[i])
  selective_bytes[i]    what it saves under the "selective" policy (input and matmul-like outputs)
  output_bytes[i]       the tensor leaving it (and the gradient flowing back into it)
  forward_extra_bytes[i]   temporaries of its forward: the peak of what it allocates, minus what
                        is still alive when it returns
  backward_extra_bytes[i]  temporaries of its backward (intermediate gradients, its input's
                        gradient): the peak of what it allocates above what it held when it began
  forward_time[i], selective_time[i]   cost of recomputing all of it / its non-kept part
  forward_flops[i], selective_flops[i], backward_time[i]
  tail_time[i], tail_flops[i]   the work after its last saved tensor, which a recomputation that
                        ends with this block skips (recomputation stops at the last saved tensor)

A plan cuts the chain into contiguous segments, each "keep" (saves everything), "selective"
(each block keeps selective_bytes and recomputes the rest right before its backward) or
"recompute" (keeps only the segment's input; backward reruns the whole segment forward, then
goes through it block by block).

Memory model: the peak of live bytes that the forward and backward create (activations, their
gradients, temporaries; not parameters, their gradients or optimizer state). With S = bytes
stored by the segments before the current one, own[i] = saved_bytes[i] without the input, and
held = what the segment holds so far:
  forward of block i      S + held + input[i] + own[i] + output[i] + forward_extra[i]
                          (recompute: held = the segment's input, own[i] is an upper bound)
  end of forward          everything stored + output[last]
  recompute, block j      S + segment input + the recomputed blocks before j + the forward of j
                          as above + output[last of segment] (the incoming gradient is alive)
  selective, block i      S + held + saved[i] + output[i] + forward_extra[i] (its recomputation)
  backward of block i     S + held (keep: saved of blocks up to i; selective: their selective
                          bytes, block i's saved; recompute: input + recomputed blocks up to i)
                          + output[i] (the incoming gradient) + backward_extra[i]
Each term only grows with S, so a plan's feasibility is decided segment by segment; solve()
keeps, for every prefix of the chain, the Pareto set of (stored bytes, recompute cost) of
feasible plans of that prefix, which makes "optimal" exact under this model.
"""

import dataclasses
import math
import statistics
import time as _time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from memengine import _extension
from memengine.live_bytes import LiveBytes

POLICIES = ("keep", "selective", "recompute")
METHODS = ("optimal", "sqrt", "uniform", "none", "all")


@dataclasses.dataclass
class Chain:
    input_bytes: list
    saved_bytes: list
    selective_bytes: list
    output_bytes: list
    forward_time: list
    selective_time: list
    forward_flops: list = None
    selective_flops: list = None
    names: list = None
    input_saved: list = None  # default: every block saves its input
    forward_extra_bytes: list = None  # default: 0
    backward_extra_bytes: list = None  # default: 0
    backward_time: list = None  # default: 0 (unknown)
    tail_time: list = None  # default: 0
    tail_flops: list = None  # default: 0

    def __post_init__(self):
        n = len(self.saved_bytes)
        if n == 0:
            raise ValueError("Chain: a chain needs at least one block")
        defaults = {"names": [f"block {i}" for i in range(n)], "input_saved": [True] * n}
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is None:
                setattr(self, field.name, defaults.get(field.name, [0] * n))
            values = getattr(self, field.name)
            if len(values) != n:
                raise ValueError(f"Chain: {field.name} has {len(values)} entries for {n} blocks")

    def __len__(self):
        return len(self.saved_bytes)

    def own_bytes(self, i):
        """Block i's saved bytes without its input."""
        return self.saved_bytes[i] - (self.input_bytes[i] if self.input_saved[i] else 0)


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first block
    end: int  # one past the last block
    policy: str


class InfeasibleBudgetError(ValueError):
    def __init__(self, budget, smallest):
        self.budget, self.smallest = budget, smallest
        super().__init__(
            f"no plan fits a budget of {budget} bytes under the memory model; the smallest feasible budget is "
            f"{smallest} bytes"
        )


def _profiles_from(chain, start):
    """For each end = start + 1, ..., n: {policy: (bytes the segment [start, end) stores, the largest
    term of the memory model (module docstring) relative to the bytes stored before it, recompute
    time, flops)}."""
    inputs, saved, selective, out = chain.input_bytes, chain.saved_bytes, chain.selective_bytes, chain.output_bytes
    forward_extra, backward_extra = chain.forward_extra_bytes, chain.backward_extra_bytes
    entry = inputs[start]
    keep_held = keep_peak = selective_held = selective_peak = 0
    recompute_held = entry  # the segment's input plus the recomputed blocks so far
    recompute_forward = recompute_backward = 0  # largest terms, without the incoming gradient
    recompute_again = 0  # largest recomputation term, without the incoming gradient
    time = flops = selective_time = selective_flops = 0
    for i in range(start, len(chain)):
        own = chain.own_bytes(i)
        forward = inputs[i] + own + out[i] + forward_extra[i]  # block i's forward, above what is held
        backward = saved[i] + out[i] + backward_extra[i]  # block i's backward, above what is held

        keep_peak = max(keep_peak, keep_held + forward, keep_held + backward)
        keep_held += saved[i]

        selective_peak = max(
            selective_peak,
            selective_held + forward,
            selective_held + saved[i] + out[i] + forward_extra[i],  # its recomputation
            selective_held + backward,
        )
        selective_held += selective[i]
        selective_time += chain.selective_time[i]
        selective_flops += chain.selective_flops[i]

        recomputed_input = 0 if i == start else inputs[i]  # the segment's input is held already
        recompute_forward = max(recompute_forward, entry + recomputed_input + own + out[i] + forward_extra[i])
        recompute_again = max(recompute_again, recompute_held + recomputed_input + own + out[i] + forward_extra[i])
        recompute_held += own + (inputs[i] if chain.input_saved[i] and i > start else 0)
        recompute_backward = max(recompute_backward, recompute_held + out[i] + backward_extra[i])
        time += chain.forward_time[i]
        flops += chain.forward_flops[i]
        recompute_peak = max(recompute_forward, recompute_again + out[i], recompute_backward)
        yield {
            "keep": (keep_held, keep_peak, 0, 0),
            "selective": (selective_held, selective_peak, selective_time, selective_flops),
            # the recomputation stops at the last tensor the segment's last block saves
            "recompute": (entry, recompute_peak, time - chain.tail_time[i], flops - chain.tail_flops[i]),
        }


def _segment_profile(chain, start, end, policy):
    for offset, profiles in enumerate(_profiles_from(chain, start)):
        if start + offset + 1 == end:
            return profiles[policy]
    raise ValueError(f"segment [{start}, {end}) is outside the chain of {len(chain)} blocks")


def simulate(chain, plan):
    """{"peak_bytes", "recompute_cost" (forward-time units), "recompute_flops"} of a plan."""
    _check_plan(chain, plan)
    stored = peak = time = flops = 0
    for segment in plan:
        seg_stored, seg_peak, seg_time, seg_flops = _segment_profile(chain, segment.start, segment.end, segment.policy)
        peak = max(peak, stored + seg_peak)
        stored += seg_stored
        time += seg_time
        flops += seg_flops
    peak = max(peak, stored + chain.output_bytes[-1])
    return {"peak_bytes": peak, "recompute_cost": time, "recompute_flops": flops}


def _check_plan(chain, plan):
    position = 0
    for segment in plan:
        if segment.start != position or segment.end <= segment.start or segment.policy not in POLICIES:
            raise ValueError(f"plan: segments must cover the chain contiguously with a policy in {POLICIES}: {plan}")
        position = segment.end
    if position != len(chain):
        raise ValueError(f"plan: covers {position} of {len(chain)} blocks")


def _segment_tables(chain):
    """(stored, peak, time) of every segment and policy, flat: [(start * (n + 1) + end) * 3 + policy]."""
    n = len(chain)
    tables = [[0.0] * (n * (n + 1) * 3) for _ in range(3)]
    for start in range(n):
        for end, profiles in enumerate(_profiles_from(chain, start), start=start + 1):
            for k, policy in enumerate(POLICIES):
                index = (start * (n + 1) + end) * 3 + k
                for table, value in zip(tables, profiles[policy][:3], strict=True):
                    table[index] = value
    return tables


def _optimal(chain, budget, tables=None, use_extension=True):
    """Minimum-recompute plan whose simulated peak fits `budget`, or None. Runs the dynamic
    program of memengine._C when it is loaded (the same algorithm, about 100x faster)."""
    n = len(chain)
    stored_table, peak_table, time_table = tables or _segment_tables(chain)
    last_output = chain.output_bytes[-1]
    if use_extension and _extension.C is not None:
        choices = _extension.C.optimal_plan(n, stored_table, peak_table, time_table, last_output, budget)
        return None if choices is None else [Segment(s, e, POLICIES[p]) for s, e, p in choices]
    # frontier[i]: Pareto-optimal (stored, cost, back-pointer) over plans of blocks [0, i), sorted
    # by stored; a back-pointer is (start, policy index, index of the point in frontier[start]).
    frontier = [[] for _ in range(n + 1)]
    frontier[0] = [(0, 0.0, None)]
    for end in range(1, n + 1):
        candidates = []
        for start in range(end):
            for k in range(3):
                index = (start * (n + 1) + end) * 3 + k
                room = budget - peak_table[index]
                for previous, (stored, cost, _) in enumerate(frontier[start]):
                    if stored > room:
                        break
                    candidates.append((stored + stored_table[index], cost + time_table[index], (start, k, previous)))
        frontier[end] = _pareto(candidates)
    feasible = [(cost, i) for i, (stored, cost, _) in enumerate(frontier[n]) if stored + last_output <= budget]
    if not feasible:
        return None
    _, index = min(feasible)
    plan, end = [], n
    while end > 0:
        start, k, previous = frontier[end][index][2]
        plan.append(Segment(start, end, POLICIES[k]))
        end, index = start, previous
    return plan[::-1]


def _pareto(points):
    """The points no other point beats on both stored bytes and cost (ties: the first kept)."""
    points.sort(key=lambda p: (p[0], p[1]))
    kept, best_cost = [], math.inf
    for point in points:
        if point[1] < best_cost:
            kept.append(point)
            best_cost = point[1]
    return kept


def smallest_feasible_budget(chain):
    """The least budget any plan fits (binary search over the optimal solver's feasibility)."""
    low = 0
    high = min(
        simulate(chain, _uniform(chain, 1, "recompute"))["peak_bytes"], simulate(chain, _none(chain))["peak_bytes"]
    )
    tables = _segment_tables(chain)
    while low < high:
        middle = (low + high) // 2
        if _optimal(chain, middle, tables) is None:
            low = middle + 1
        else:
            high = middle
    return high


def _none(chain):
    return [Segment(0, len(chain), "keep")]


def _uniform(chain, size, policy):
    return [Segment(s, min(s + size, len(chain)), policy) for s in range(0, len(chain), size)]


def _sqrt(chain):
    """What torch.utils.checkpoint.checkpoint_sequential(blocks, segments=round(sqrt(n))) does:
    segments - 1 recomputed segments of n // segments blocks, then the rest run normally."""
    n = len(chain)
    segments = max(1, round(math.sqrt(n)))
    size = n // segments
    plan = _uniform(chain, size, "recompute")[: segments - 1]
    start = plan[-1].end if plan else 0
    return plan + [Segment(start, n, "keep")]


def solve(chain, budget_bytes=None, method="optimal", segment_blocks=None):
    """A plan (list of Segment). "optimal" needs budget_bytes and raises InfeasibleBudgetError
    (naming the smallest feasible budget) when nothing fits. "uniform" recomputes segments of
    `segment_blocks` blocks (default ceil(sqrt(n))); "sqrt" is checkpoint_sequential's plan;
    "none" keeps everything; "all" recomputes every block on its own."""
    if method not in METHODS:
        raise ValueError(f"solve: method must be one of {METHODS}, got {method!r}")
    if method == "none":
        return _none(chain)
    if method == "all":
        return _uniform(chain, 1, "recompute")
    if method == "sqrt":
        return _sqrt(chain)
    if method == "uniform":
        return _uniform(chain, segment_blocks or math.ceil(math.sqrt(len(chain))), "recompute")
    if budget_bytes is None:
        raise ValueError('solve: method "optimal" needs budget_bytes')
    plan = _optimal(chain, budget_bytes)
    if plan is None:
        raise InfeasibleBudgetError(budget_bytes, smallest_feasible_budget(chain))
    return plan


def report(chain, plan):
    """A readable table: one row per segment, then the predicted peak and recompute cost."""
    rows = [f"{'blocks':<14} {'policy':<10} {'bytes kept':>14} {'recompute time':>15} {'recompute FLOPs':>16}"]
    for segment in plan:
        stored, _, time, flops = _segment_profile(chain, segment.start, segment.end, segment.policy)
        blocks = f"{segment.start}-{segment.end - 1}" if segment.end - segment.start > 1 else str(segment.start)
        rows.append(f"{blocks:<14} {segment.policy:<10} {stored:>14,} {time:>15.4g} {flops:>16.4g}")
    result = simulate(chain, plan)
    rows.append(
        f"predicted peak {result['peak_bytes']:,} bytes; recompute {result['recompute_cost']:.4g} time units, "
        f"{result['recompute_flops']:.4g} FLOPs"
    )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# profile(): measuring a chain

# Ops whose outputs the "selective" policy keeps (the expensive ones to recompute).
SELECTIVE_KEPT_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::convolution",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
    }
)
# Time model on the meta device (no kernels run): matmul-like ops at this rate in FLOP/s, all
# other ops at this rate in bytes written per second. Only ratios matter to the solver.
META_FLOPS_PER_SECOND = 100e12
META_BYTES_PER_SECOND = 1e12


def _storage_key(t):
    return t.untyped_storage()._cdata


class _OpRecorder(TorchDispatchMode):
    """Records the bytes of the outputs of matmul-like ops (what selective checkpointing caches,
    whether autograd saves them or not) and the time spent in those ops and in the others
    (measured, or modelled on the meta device)."""

    def __init__(self, measure):
        super().__init__()
        self.measure = measure
        self.kept = {}  # storage key -> weak reference to a matmul-like output on that storage
        self.kept_bytes = 0  # bytes of their distinct storages
        self.kept_time = 0.0
        self.other_time = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = _time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = _time.perf_counter() - start
        name = func._schema.name
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        kept = name in SELECTIVE_KEPT_OPS
        if not self.measure:
            formula = flop_registry.get(func._overloadpacket)
            if kept and formula is not None:
                elapsed = formula(*args, **(kwargs or {}), out_val=out) / META_FLOPS_PER_SECOND
            else:
                elapsed = sum(t.numel() * t.element_size() for t in outputs) / META_BYTES_PER_SECOND
        if kept:
            self.kept_time += elapsed
        else:
            self.other_time += elapsed
        for t in outputs if kept else ():
            key = _storage_key(t)
            if key not in self.kept or self.kept[key]() is None:  # new (a freed storage's address is reused)
                self.kept_bytes += t.untyped_storage().nbytes()
            self.kept[key] = weakref.ref(t)
        return out


def _tensor_bytes(value):
    return sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def _hidden_state(output):
    """What the next block receives: the output, or the first element of a tuple output."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _drop_gradient(tensor):
    tensor.grad = None


def _median_seconds(fn, repeats=3):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        begin = _time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append(_time.perf_counter() - begin)
    return statistics.median(samples)


def _profile_block(block, args, kwargs, measure):
    """Runs one block forward and backward on its own and measures it (see profile()). The block
    runs on detached copies of its parameters and input whose gradients are dropped as soon as
    they are accumulated, so the user's .grad, main_grad and gradient hooks are left alone."""
    leaves = {name: p.detach().requires_grad_(p.requires_grad) for name, p in block.named_parameters()}
    hidden = args[0].detach().requires_grad_(args[0].is_floating_point())
    for leaf in [hidden, *leaves.values()]:
        if leaf.requires_grad:
            leaf.register_post_accumulate_grad_hook(_drop_gradient)
    args = (hidden, *args[1:])
    # Parameters and the other arguments (masks, position embeddings) are shared by the blocks
    # and alive anyway: not counted as saved.
    shared = {
        _storage_key(t) for t in [*leaves.values(), *tree_flatten((args[1:], kwargs))[0]] if isinstance(t, torch.Tensor)
    }
    saved = {}  # storage key -> bytes
    recorder = _OpRecorder(measure)
    counter = FlopCounterMode(display=False)
    at_last_save = (0, 0.0)  # FLOPs and time done when autograd saved its last tensor

    def pack(t):
        nonlocal at_last_save
        key = _storage_key(t)
        if key not in shared:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        at_last_save = (counter.get_total_flops(), recorder.kept_time + recorder.other_time)
        return t

    def run():
        return torch.func.functional_call(block, leaves, args, kwargs)

    with LiveBytes() as live:
        with counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
                output = run()
        forward_extra = live.peak - live.mark()
        target = _hidden_state(output)
        backward_extra = 0
        if target.requires_grad:
            gradient = torch.ones_like(target)
            before = live.mark()
            torch.autograd.backward(target, gradient)
            backward_extra = live.window_peak - before
    # Selective checkpointing holds the block's input and every matmul-like output.
    selective = _tensor_bytes(hidden) + recorder.kept_bytes
    forward_time = recorder.kept_time + recorder.other_time
    flops = counter.get_total_flops()
    # A recomputation stops at the last saved tensor: the work after it is skipped.
    tail_share = (forward_time - at_last_save[1]) / forward_time if forward_time > 0 else 0.0
    if measure:  # the recorder's per-op timing adds overhead: time the block again on its own
        share = recorder.other_time / forward_time if forward_time > 0 else 0.0
        with torch.no_grad():
            forward_time = _median_seconds(run)
        selective_time = forward_time * share
        backward_time = 0.0
        if target.requires_grad:
            backward_time = max(
                0.0, _median_seconds(lambda: torch.autograd.backward(_hidden_state(run()), gradient)) - forward_time
            )
    else:
        selective_time = recorder.other_time
        backward_time = 2 * forward_time  # the usual estimate: two matmuls per forward matmul
    return output, {
        "input_bytes": _tensor_bytes(args[0]),
        "saved_bytes": sum(saved.values()),
        "input_saved": _storage_key(hidden) in saved,
        "selective_bytes": selective,
        "output_bytes": _tensor_bytes(target),
        "forward_extra_bytes": forward_extra,
        "backward_extra_bytes": backward_extra,
        "forward_time": forward_time,
        "selective_time": selective_time,
        "backward_time": backward_time,
        "forward_flops": flops,
        "tail_time": forward_time * tail_share,
        "tail_flops": flops - at_last_save[0],
        "selective_flops": 0,  # FLOPs are counted for matmul-like ops only, which selective keeps
    }


def profile(blocks, *sample_args, **sample_kwargs):
    """Measures a chain: runs `blocks` (an nn.Sequential or a list of modules) with grad, calling
    each as block(hidden, *sample_args[1:], **sample_kwargs), where hidden is sample_args[0] for
    the first block and the previous block's output (its first element if a tuple) after that:
    the nn.Sequential pattern and the Hugging Face decoder-layer pattern. Each block also runs a
    backward (gradient of ones) to measure its temporaries, with live bytes counted by
    LiveBytes. Saved bytes are deduplicated by storage, parameters excluded. On the meta device
    nothing runs: sizes come from shapes and time from FLOPs and bytes (META_* rates).

    No side effects: the blocks' .grad, main_grad and hooks are untouched (gradients go to
    detached copies and are dropped) and their buffers (BatchNorm statistics) are restored."""
    blocks = list(blocks)
    if not blocks or not sample_args:
        raise ValueError("profile: needs at least one block and a sample input")
    tensors = [t for t in tree_flatten((sample_args, sample_kwargs))[0] if isinstance(t, torch.Tensor)]
    measure = not any(t.device.type == "meta" for t in tensors)
    fields = {f.name: [] for f in dataclasses.fields(Chain) if f.name != "names"}
    hidden, extra = sample_args[0], sample_args[1:]
    with torch.enable_grad():
        for block in blocks:
            state = [(b, b.clone()) for b in block.buffers()]
            try:
                output, measured = _profile_block(block, (hidden, *extra), sample_kwargs, measure)
            finally:
                with torch.no_grad():
                    for buffer, value in state:
                        buffer.copy_(value)
            for name, value in measured.items():
                fields[name].append(value)
            hidden = _hidden_state(output)
    return Chain(**fields, names=[type(b).__name__ for b in blocks])
