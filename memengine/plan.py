"""me.plan: the public face of recompute planning (memengine.segments).

chain = me.plan.profile(blocks, *sample_args, **sample_kwargs)   # also on the meta device
plan  = me.plan.solve(chain, budget_bytes, method="optimal")
me.plan.simulate(chain, plan) -> {"peak_bytes", "recompute_cost", "recompute_flops"}
print(me.plan.report(chain, plan))
"""

from memengine.segments.live_bytes import LiveBytes
from memengine.segments.model import POLICIES, Chain, InfeasibleBudgetError, Segment, report, simulate
from memengine.segments.profile import SELECTIVE_KEPT_OPS, profile
from memengine.segments.solve import METHODS, smallest_feasible_budget, solve

__all__ = [
    "METHODS",
    "POLICIES",
    "SELECTIVE_KEPT_OPS",
    "Chain",
    "InfeasibleBudgetError",
    "LiveBytes",
    "Segment",
    "profile",
    "report",
    "simulate",
    "smallest_feasible_budget",
    "solve",
]
