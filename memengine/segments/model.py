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

POLICIES = ("keep", "selective", "recompute")


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


def profiles_from(chain, start):
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


def segment_profile(chain, start, end, policy):
    for offset, profiles in enumerate(profiles_from(chain, start)):
        if start + offset + 1 == end:
            return profiles[policy]
    raise ValueError(f"segment [{start}, {end}) is outside the chain of {len(chain)} blocks")


def simulate(chain, plan):
    """{"peak_bytes", "recompute_cost" (forward-time units), "recompute_flops"} of a plan."""
    check_plan(chain, plan)
    stored = peak = time = flops = 0
    for segment in plan:
        seg_stored, seg_peak, seg_time, seg_flops = segment_profile(chain, segment.start, segment.end, segment.policy)
        peak = max(peak, stored + seg_peak)
        stored += seg_stored
        time += seg_time
        flops += seg_flops
    peak = max(peak, stored + chain.output_bytes[-1])
    return {"peak_bytes": peak, "recompute_cost": time, "recompute_flops": flops}


def check_plan(chain, plan):
    position = 0
    for segment in plan:
        if segment.start != position or segment.end <= segment.start or segment.policy not in POLICIES:
            raise ValueError(f"plan: segments must cover the chain contiguously with a policy in {POLICIES}: {plan}")
        position = segment.end
    if position != len(chain):
        raise ValueError(f"plan: covers {position} of {len(chain)} blocks")


def report(chain, plan):
    """A readable table: one row per segment, then the predicted peak and recompute cost."""
    rows = [f"{'blocks':<14} {'policy':<10} {'bytes kept':>14} {'recompute time':>15} {'recompute FLOPs':>16}"]
    for segment in plan:
        stored, _, time, flops = segment_profile(chain, segment.start, segment.end, segment.policy)
        blocks = f"{segment.start}-{segment.end - 1}" if segment.end - segment.start > 1 else str(segment.start)
        rows.append(f"{blocks:<14} {segment.policy:<10} {stored:>14,} {time:>15.4g} {flops:>16.4g}")
    result = simulate(chain, plan)
    rows.append(
        f"predicted peak {result['peak_bytes']:,} bytes; recompute {result['recompute_cost']:.4g} time units, "
        f"{result['recompute_flops']:.4g} FLOPs"
    )
    return "\n".join(rows)
