"""DataParallel: what one Engine step does across the ranks of a process group.

Per step, on each rank, in this order (the Engine calls these):
1. `last_backward(loss_total, tokens_total)` before the last micro-batch's backward: one async SUM
   all-reduce of [loss sum, token count] (the step's global token count, in flight while the
   backward runs), then the GradReducer starts watching readiness (buckets launch during the
   backward).
2. `finish()` after it: the remaining buckets are launched and every reduction is waited for;
   returns the global (loss sum, token count).
3. `stats(scale, step, weights_changed)`: scales the reduced gradient by 1/(global tokens x loss scale)
   and measures it. Unsharded, every rank holds the whole reduced buffer: the norm is local. Sharded
   (ZeRO-1), each rank measures its shard and one small SUM all-reduce combines the squared norms (in
   float64) and non-finite counts by grad_stats_'s overflow rule (memengine.ops.combine_grad_stats).
   That same small all-reduce carries, per parameter, whether any rank gave it a gradient this step
   (a parameter some rank used counts as received on every rank: the optimizer steps it everywhere, as
   a single process on the whole batch would; one nobody used is skipped everywhere), and the step's
   agreement row (below).
4. `clip_(stats, max_norm)` with the global norm.
So a step issues: the totals all-reduce, a collective per bucket, the small all-reduce, and with ZeRO-1
the optimizer's all-gathers once every rank agreed to step.

Ranks agree or all fail. Collectives are matched only by their order, so each rank issues that same
sequence whatever happens to it, and the small all-reduce carries one row per rank: [failed, step
number, weights changed]. Every rank reads the same summed table and reaches the same verdict:
- a rank that raised anywhere in its step before the small all-reduce (loss_fn, a bad batch, a graph
  change its readiness caught, an out-of-memory error) calls `abandon(step, error)`: it issues the
  collectives of the step it had not issued yet (the totals, the buckets not launched, in order) and
  the small all-reduce with its `failed` flag set, then its own exception propagates; every other rank
  raises StepFailedOnAnotherRank. No rank steps, and all are at the same point for the next step;
- ranks at different step numbers (a loop that skipped engine.step on some ranks) all raise
  StepFailedOnAnotherRank before stepping: the collectives just summed belong to different steps;
- weights changed since the last step on some ranks only (model.load_state_dict on rank 0) all raise:
  each rank would re-derive its masters from different weights.
"""

import torch
import torch.distributed as dist

from memengine import ops
from memengine.distributed.reducer import GradReducer

# The agreement row of a rank in the small all-reduce: one column per rank, one row per field.
FAILED, STEP, WEIGHTS_CHANGED = range(3)


class StepFailedOnAnotherRank(RuntimeError):
    """Raised on every rank whose own step went well when another rank's step failed, when ranks are at
    different step numbers, or when weights changed on some ranks only. Nothing was stepped on any rank;
    a loop that catches it (and the failing ranks' own exceptions) and goes on stays in step on every rank."""


class DataParallel:
    def __init__(self, buffer, group, shard, overlap=True):
        self.buffer = buffer
        self.group = group
        self.shard = shard
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.reducer = GradReducer(buffer, group, shard=shard, overlap=overlap)
        self._totals = None
        self._totals_work = None  # set from last_backward() until finish(): this step's buckets are under way

    def broadcast_model(self, model):
        """Rank 0's parameters and buffers to every rank (as torch DDP does when it wraps a model), so that
        replicas start identical whatever each rank initialised."""
        source = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=source, group=self.group)

    def last_backward(self, loss_total, tokens_total):
        self._launch_totals(torch.stack([loss_total, tokens_total]))
        self.reducer.watch()

    def _launch_totals(self, totals):
        self._totals = totals
        self._totals_work = dist.all_reduce(self._totals, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def finish(self):
        """(global loss sum, global token count), fp64 device tensors, once every bucket is reduced."""
        if self._totals_work is None:
            raise RuntimeError("memengine DataParallel.finish: last_backward() was not called in this step")
        self.reducer.finish()
        self._totals_work.wait()
        self._totals_work = None
        return self._totals[0], self._totals[1]

    def abandon(self, step, error):
        """After this rank raised `error` in step number `step`, before the small all-reduce: issues the rest of
        the step's collectives (the totals if not yet, every bucket not yet launched, the small all-reduce with
        this rank's failed flag), so that every other rank raises StepFailedOnAnotherRank instead of waiting,
        and adds a note saying so to `error`, which the caller re-raises. Nothing is stepped anywhere."""
        try:
            launched = self._totals_work is not None
            if not launched:
                self._launch_totals(torch.zeros(2, dtype=torch.float64, device=self.buffer.data.device))
            self.reducer.abandon(launched)
            self._totals_work.wait()
            self._totals_work = None
            self._all_reduce_small(self._zero_payload(), step, failed=True, weights_changed=False)
        except Exception as follow_up:  # the process group itself failed: nothing more to tell the others
            error.add_note(
                f"memengine data parallelism: completing step {step}'s collectives after this error failed too "
                f"({follow_up!r}); other ranks may be left waiting until the process group's timeout"
            )
            return
        error.add_note(
            f"memengine data parallelism: rank {self.rank} completed step {step}'s collectives flagged as failed; "
            "every other rank raises StepFailedOnAnotherRank for this step and no rank stepped its optimizer"
        )

    def _zero_payload(self):
        length = len(self.buffer.params) + (2 if self.shard else 0)
        return torch.zeros(length, dtype=torch.float64, device=self.buffer.data.device)

    def _all_reduce_small(self, payload, step, failed, weights_changed):
        """SUM all-reduce of this rank's payload with its agreement row appended; returns (summed payload, the
        agreement table [field, rank] as a list of lists)."""
        row = torch.zeros(3, self.world, dtype=torch.float64, device=payload.device)
        row[FAILED, self.rank] = float(failed)
        row[STEP, self.rank] = float(step)
        row[WEIGHTS_CHANGED, self.rank] = float(weights_changed)
        small = torch.cat([payload, row.reshape(-1)])
        dist.all_reduce(small, op=dist.ReduceOp.SUM, group=self.group)
        return small[: payload.numel()], small[payload.numel() :].reshape(3, self.world).tolist()

    def stats(self, scale, step, weights_changed=False):
        """Scales the reduced gradient in place; returns the global [L2 norm, non-finite count] (fp32). Raises
        StepFailedOnAnotherRank (on every rank alike) when the agreement table says another rank failed this
        step, ranks are at different steps, or weights changed on some ranks only."""
        params = self.buffer.params
        received = torch.tensor(
            [self.buffer.received_gradient(p) for p in params], dtype=torch.float64, device=self.buffer.data.device
        )
        if self.shard:
            pieces = [ops.grad_stats_(self.buffer.data[start:end], scale) for start, end in self.shard_ranges()]
            payload = torch.cat([ops.grad_stats_in_pieces(pieces), received])
        else:
            stats = self.buffer.stats(scale)
            payload = received
        summed, table = self._all_reduce_small(payload, step, failed=False, weights_changed=weights_changed)
        self._check_agreement(table, step)
        received_anywhere = summed[-len(params) :].tolist()
        for p, count in zip(params, received_anywhere, strict=True):
            if count > 0 and not self.buffer.received_gradient(p):
                self.buffer.mark_received(p)
        if self.shard:
            stats = ops.combine_grad_stats(summed[:2])
        return stats

    def _check_agreement(self, table, step):
        failed = [rank for rank, flag in enumerate(table[FAILED]) if flag]
        steps = [int(value) for value in table[STEP]]
        changed = [rank for rank, flag in enumerate(table[WEIGHTS_CHANGED]) if flag]
        if failed:
            problem = (
                f"step {step} raised an exception on rank(s) {failed} (their own error says what); this rank's "
                "collectives were matched with the ones those ranks completed after their error"
            )
        elif len(set(steps)) > 1:
            problem = (
                f"the ranks are at different steps (engine.step call number per rank: {steps}), so the collectives "
                "just summed belong to different steps. Every rank must call engine.step the same number of times: "
                "a loop that skips a batch must skip it on every rank (every later step fails the same way)"
            )
        elif changed and len(changed) < self.world:
            problem = (
                f"the model's weights were changed since the last step on rank(s) {changed} only (load_state_dict, "
                "an init function or an in-place edit), so the ranks would train different weights; change them "
                "on every rank alike"
            )
        else:
            return
        raise StepFailedOnAnotherRank(
            f"memengine data parallelism, rank {self.rank}: {problem}. No rank stepped its optimizer in this step; "
            "a loop that catches this error (and the failing ranks' own) and goes on stays in step on every rank"
        )

    def shard_ranges(self):
        return [self.reducer.shard_range(bucket) for bucket in self.buffer.buckets]

    def clip_(self, stats, max_norm):
        if self.shard:
            for start, end in self.shard_ranges():
                ops.clip_(self.buffer.data[start:end], stats, max_norm)
        else:
            self.buffer.clip_(stats, max_norm)
