"""Solving for a recompute plan: the optimal plan for a byte budget under the memory model of
memengine.segments.model (a Pareto dynamic program, in C++ when memengine._C is loaded), and the
usual baselines ("sqrt" as checkpoint_sequential, "uniform", "none", "all")."""

import math
import numbers

from memengine.ops import extension
from memengine.segments.budget import activation_share, parse_bytes
from memengine.segments.model import POLICIES, InfeasibleBudgetError, Segment, profiles_from, simulate

METHODS = ("optimal", "sqrt", "uniform", "none", "all")


def _segment_tables(chain):
    """(stored, peak, time) of every segment and policy, flat: [(start * (n + 1) + end) * 3 + policy]."""
    n = len(chain)
    tables = [[0.0] * (n * (n + 1) * 3) for _ in range(3)]
    for start in range(n):
        for end, profiles in enumerate(profiles_from(chain, start), start=start + 1):
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
    if use_extension and extension.C is not None:
        choices = extension.C.optimal_plan(n, stored_table, peak_table, time_table, last_output, budget)
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
    """A plan (list of Segment). "optimal" needs budget_bytes (bytes, or a size string such as
    "6GiB") and raises InfeasibleBudgetError
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
    if isinstance(budget_bytes, str):
        budget_bytes = parse_bytes(budget_bytes)
    if not isinstance(budget_bytes, numbers.Real):
        kind = type(budget_bytes).__name__
        raise TypeError(f"solve: budget_bytes must be a byte count or a size such as '6GiB', got a {kind}")
    budget_bytes = int(budget_bytes)
    plan = _optimal(chain, budget_bytes)
    if plan is None:
        raise InfeasibleBudgetError(budget_bytes, smallest_feasible_budget(chain))
    return plan


def activation_budget(chain, budget):
    """The blocks' activation budget in bytes: `budget` itself, or for a share such as "50%" (normalize_budget)
    that share of the chain's activation peak without recomputation, the meaning Engine(budget="50%") gives it."""
    share = activation_share(budget)
    if share is None:
        return budget
    return int(share * simulate(chain, _none(chain))["peak_bytes"])
