"""Recompute planning for a chain of blocks: a memory model (simulate), an optimal solver and the
usual baselines.

A chain describes n blocks run one after the other. Per block i:
  input_bytes[i]        the tensor entering the block
  saved_bytes[i]        what autograd saves when the block runs with grad (parameters excluded)
  selective_bytes[i]    what it saves under the "selective" policy (matmul-like outputs kept)
  output_bytes[i]       the tensor leaving it (and the gradient flowing back into it)
  forward_time[i], selective_time[i]   cost of recomputing all of it / its non-kept part
  forward_flops[i], selective_flops[i]

A plan cuts the chain into contiguous segments, each "keep" (saves everything), "selective"
(each block keeps selective_bytes and recomputes the rest right before its backward) or
"recompute" (keeps only the segment's input; backward reruns the whole segment forward, then
goes through it block by block).

Memory model (what simulate() adds up; S = bytes stored by the segments before the current one):
  forward of block i:   S + stored so far in its segment + saved_bytes[i] + output_bytes[i]
  end of forward:       everything stored + output_bytes[last]
  backward of block i:  S + (recompute: segment input) + bytes held by the blocks of its segment
                        up to i (keep/recompute: saved_bytes; selective: selective_bytes, block i
                        itself saved_bytes) + output_bytes[i] (the incoming gradient)
Each term only grows with S, so a plan's feasibility is decided segment by segment; solve()
keeps, for every prefix of the chain, the Pareto set of (stored bytes, recompute cost) of
feasible plans of that prefix, which makes "optimal" exact under this model.
"""

import dataclasses
import math
import statistics
import time as _time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from memengine import _extension

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

    def __post_init__(self):
        n = len(self.saved_bytes)
        if n == 0:
            raise ValueError("Chain: a chain needs at least one block")
        self.forward_flops = self.forward_flops or [0] * n
        self.selective_flops = self.selective_flops or [0] * n
        self.names = self.names or [f"block {i}" for i in range(n)]
        for field in dataclasses.fields(self):
            values = getattr(self, field.name)
            if len(values) != n:
                raise ValueError(f"Chain: {field.name} has {len(values)} entries for {n} blocks")

    def __len__(self):
        return len(self.saved_bytes)


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
    term of the memory model relative to the bytes stored before it, recompute time, flops)}."""
    saved, selective, out = chain.saved_bytes, chain.selective_bytes, chain.output_bytes
    entry = chain.input_bytes[start]
    held = entry  # recompute: its input plus the recomputed blocks up to i
    recompute_peak = keep_stored = keep_peak = selective_stored = selective_peak = 0
    time = flops = selective_time = selective_flops = 0
    for i in range(start, len(chain)):
        recompute_peak = max(recompute_peak, entry + saved[i] + out[i])  # its forward
        held += saved[i]
        recompute_peak = max(recompute_peak, held + out[i])  # its backward, after the recomputation
        time += chain.forward_time[i]
        flops += chain.forward_flops[i]
        keep_peak = max(keep_peak, keep_stored + saved[i] + out[i])  # forward and backward of block i
        keep_stored += saved[i]
        selective_peak = max(selective_peak, selective_stored + saved[i] + out[i])
        selective_stored += selective[i]
        selective_time += chain.selective_time[i]
        selective_flops += chain.selective_flops[i]
        yield {
            "keep": (keep_stored, keep_peak, 0, 0),
            "selective": (selective_stored, selective_peak, selective_time, selective_flops),
            "recompute": (entry, recompute_peak, time, flops),
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
    equal segments, all recomputed except the last, which runs normally."""
    n = len(chain)
    segments = max(1, round(math.sqrt(n)))
    size = math.ceil(n / segments)
    plan = _uniform(chain, size, "recompute")
    last = plan[-1]
    plan[-1] = Segment(last.start, last.end, "keep")
    return plan


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
    """Records, per output storage, which op made it, and the time spent in matmul-like ops and
    in the others (measured, or modelled on the meta device)."""

    def __init__(self, measure):
        super().__init__()
        self.measure = measure
        self.producer = {}  # storage key -> op name
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
        for t in outputs:
            self.producer.setdefault(_storage_key(t), name)
        return out


def _tensor_bytes(value):
    return sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def _hidden_state(output):
    """What the next block receives: the output, or the first element of a tuple output."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _profile_block(block, args, kwargs, measure):
    parameters = {_storage_key(p) for p in block.parameters()}
    input_keys = {_storage_key(t) for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
    saved = {}  # storage key -> (bytes, tensor's storage key)

    def pack(t):
        key = _storage_key(t)
        if key not in parameters:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    recorder = _OpRecorder(measure)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
            output = block(*args, **kwargs)
    selective = sum(
        size for key, size in saved.items() if key in input_keys or recorder.producer.get(key) in SELECTIVE_KEPT_OPS
    )
    forward_time = recorder.kept_time + recorder.other_time
    if measure:  # the recorder's per-op timing adds overhead: time the block again on its own
        samples = []
        with torch.no_grad():
            block(*args, **kwargs)  # warm-up
        for _ in range(3):
            start = _time.perf_counter()
            with torch.no_grad():
                block(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples.append(_time.perf_counter() - start)
        share = recorder.other_time / forward_time if forward_time > 0 else 0.0
        forward_time = statistics.median(samples)
        selective_time = forward_time * share
    else:
        selective_time = recorder.other_time
    return output, {
        "input_bytes": _tensor_bytes(args[0]),
        "saved_bytes": sum(saved.values()),
        "selective_bytes": selective,
        "output_bytes": _tensor_bytes(_hidden_state(output)),
        "forward_time": forward_time,
        "selective_time": selective_time,
        "forward_flops": counter.get_total_flops(),
        "selective_flops": 0,  # FLOPs are counted for matmul-like ops only, which selective keeps
    }


def profile(blocks, *sample_args, **sample_kwargs):
    """Measures a chain: runs `blocks` (an nn.Sequential or a list of modules) with grad, calling
    each as block(hidden, *sample_args[1:], **sample_kwargs), where hidden is sample_args[0] for
    the first block and the previous block's output (its first element if a tuple) after that:
    the nn.Sequential pattern and the Hugging Face decoder-layer pattern. Saved bytes are
    deduplicated by storage, parameters excluded. On the meta device nothing runs: sizes come from
    shapes and time from FLOPs and bytes (META_* rates)."""
    blocks = list(blocks)
    if not blocks or not sample_args:
        raise ValueError("profile: needs at least one block and a sample input")
    tensors = [t for t in tree_flatten((sample_args, sample_kwargs))[0] if isinstance(t, torch.Tensor)]
    measure = not any(t.device.type == "meta" for t in tensors)
    fields = {f.name: [] for f in dataclasses.fields(Chain) if f.name != "names"}
    hidden, extra = sample_args[0], sample_args[1:]
    with torch.enable_grad():
        for block in blocks:
            output, measured = _profile_block(block, (hidden, *extra), sample_kwargs, measure)
            for name, value in measured.items():
                fields[name].append(value)
            hidden = _hidden_state(output)
    return Chain(**fields, names=[type(b).__name__ for b in blocks])
