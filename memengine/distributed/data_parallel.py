"""DataParallel: what one Engine step does across the ranks of a process group.

Per step, on each rank, in this order (the Engine calls these):
1. `last_backward(loss_total, tokens_total)` before the last micro-batch's backward: one async SUM
   all-reduce of [loss sum, token count] (the step's global token count, in flight while the
   backward runs), then the GradReducer starts watching readiness (buckets launch during the
   backward).
2. `finish()` after it: the remaining buckets are launched and every reduction is waited for;
   returns the global (loss sum, token count).
3. `stats(scale)`: scales the reduced gradient by 1/(global tokens x loss scale) and measures it.
   Unsharded, every rank holds the whole reduced buffer: the norm is local. Sharded (ZeRO-1), each
   rank measures its shard and one small SUM all-reduce combines the squares and non-finite counts.
   That same small all-reduce carries, per parameter, whether any rank gave it a gradient this
   step: a parameter some rank used counts as received on every rank (the optimizer steps it
   everywhere, as a single process on the whole batch would), one nobody used is skipped everywhere.
4. `clip_(stats, max_norm)` with the global norm.
So a step issues: a collective per bucket, plus exactly two small all-reduces.
"""

import torch
import torch.distributed as dist

from memengine import ops
from memengine.distributed.reducer import GradReducer


class DataParallel:
    def __init__(self, buffer, group, shard, overlap=True):
        self.buffer = buffer
        self.group = group
        self.shard = shard
        self.reducer = GradReducer(buffer, group, shard=shard, overlap=overlap)
        self._totals = None
        self._totals_work = None

    def broadcast_model(self, model):
        """Rank 0's parameters and buffers to every rank (as torch DDP does when it wraps a model), so that
        replicas start identical whatever each rank initialised."""
        source = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=source, group=self.group)

    def last_backward(self, loss_total, tokens_total):
        self._totals = torch.stack([loss_total, tokens_total])
        self._totals_work = dist.all_reduce(self._totals, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self.reducer.watch()

    def finish(self):
        """(global loss sum, global token count), fp64 device tensors, once every bucket is reduced."""
        if self._totals_work is None:
            raise RuntimeError("memengine DataParallel.finish: last_backward() was not called in this step")
        self.reducer.finish()
        self._totals_work.wait()
        self._totals_work = None
        return self._totals[0], self._totals[1]

    def abandon(self):
        """After a step that raised: waits for what was launched, so that nothing writes the buffer later."""
        self.reducer.abandon()
        if self._totals_work is not None:
            self._totals_work.wait()
            self._totals_work = None

    def stats(self, scale):
        """Scales the reduced gradient in place; returns the global [L2 norm, non-finite count] (fp32)."""
        params = self.buffer.params
        received = torch.tensor(
            [self.buffer.received_gradient(p) for p in params], dtype=torch.float32, device=self.buffer.data.device
        )
        if self.shard:
            squares = torch.zeros(2, dtype=torch.float32, device=received.device)
            for start, end in self.shard_ranges():
                piece = ops.grad_stats_(self.buffer.data[start:end], scale)
                squares += torch.stack([piece[0] * piece[0], piece[1]])
            small = torch.cat([squares, received])
        else:
            stats = self.buffer.stats(scale)
            small = received
        dist.all_reduce(small, op=dist.ReduceOp.SUM, group=self.group)
        received_anywhere = small[-len(params) :].tolist()
        for p, count in zip(params, received_anywhere, strict=True):
            if count > 0 and not self.buffer.received_gradient(p):
                self.buffer.mark_received(p)
        if self.shard:
            stats = torch.stack([small[0].sqrt(), small[1]])
        return stats

    def shard_ranges(self):
        return [self.reducer.shard_range(bucket) for bucket in self.buffer.buckets]

    def clip_(self, stats, max_norm):
        if self.shard:
            for start, end in self.shard_ranges():
                ops.clip_(self.buffer.data[start:end], stats, max_norm)
        else:
            self.buffer.clip_(stats, max_norm)
