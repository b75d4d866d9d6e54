"""GradReducer: sums a GradBuffer over the ranks of a process group, bucket by bucket, overlapped with
the last micro-batch's backward.

The buffer's buckets (GradBuffer(bucket_bytes=..., bucket_multiple=world)) are contiguous ranges of
GradBuffer.data ending on parameter boundaries. Micro-batches 1..M-1 communicate nothing: their
gradients only accumulate locally. For the last one, `watch()` before its backward starts the
readiness count (memengine.grad.readiness); a bucket whose parameters are all complete is launched
at once, asynchronously, as an fp32 SUM all-reduce (or, sharded, a reduce-scatter that leaves each
rank the sum of its own shard), strictly in bucket index order, because every rank must issue the
same collectives in the same order. `finish()` after the backward launches what is left (all of it
on the first step, which learns the contribution counts), in order, and waits for everything.

A parameter that received no gradient in the step on this rank is zeroed just before its bucket
launches, so it contributes zeros, not last step's values, and no rank waits for it.
"""

import torch.distributed as dist

from memengine.distributed import collectives
from memengine.grad.readiness import Readiness


class GradReducer:
    def __init__(self, buffer, group, shard, overlap=True):
        """buffer: a GradBuffer whose buckets split into world-size shards when `shard`; group: the
        torch.distributed process group; shard: reduce-scatter (ZeRO-1) instead of all-reduce;
        overlap: launch buckets during the backward (False: only after it)."""
        self.buffer = buffer
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shard = shard
        self.overlap = overlap
        if shard:
            for bucket in buffer.buckets:
                if bucket.numel % self.world:
                    raise ValueError(
                        f"GradReducer: bucket {bucket.index} of {bucket.numel} elements does not split into "
                        f"{self.world} shards; build the GradBuffer with bucket_multiple={self.world}"
                    )
        self.paths = collectives.probe(group, buffer.data.device)
        self._bucket_of = {id(p): bucket for bucket in buffer.buckets for p in bucket.params}
        self._readiness = Readiness(buffer, self._parameter_ready) if overlap else None
        self._waiting = {}  # bucket index -> parameters not yet complete
        self._next = 0  # the next bucket to launch
        self._works = []
        self.launched_during_backward = 0  # buckets of the last step launched before finish()

    def shard_range(self, bucket):
        """[start, end) of this rank's shard of `bucket` within GradBuffer.data."""
        return bucket.shard(self.rank, self.world)

    def watch(self):
        """Call right before the last micro-batch's backward."""
        self._waiting = {bucket.index: {id(p) for p in bucket.params} for bucket in self.buffer.buckets}
        self._next = 0
        self._works = []
        self.launched_during_backward = 0
        if self._readiness is not None:
            self._readiness.watch()
            self._launch_ready()  # buckets of parameters that get no contribution at all

    def _parameter_ready(self, p):
        self._waiting[self._bucket_of[id(p)].index].discard(id(p))
        self._launch_ready()

    def _launch_ready(self):
        buckets = self.buffer.buckets
        while self._next < len(buckets) and not self._waiting[self._next]:
            self._launch(buckets[self._next])
            self.launched_during_backward += 1

    def _launch(self, bucket):
        self.buffer.finish_window(bucket.params)  # no gradient here in this step: contribute zeros
        view = self.buffer.data[bucket.start : bucket.end]
        if self.shard:
            work = collectives.reduce_scatter_in_place(view, self.group, self.paths["reduce_scatter"])
        else:
            work = collectives.all_reduce(view, self.group)
        self._works.append(work)
        self._next += 1

    def finish(self):
        """Call after the last micro-batch's backward: launches the remaining buckets in order and waits
        for all reductions. Afterwards GradBuffer.data holds the sum over ranks (sharded: in this
        rank's shard of every bucket)."""
        if self._readiness is not None:
            self._readiness.finish()
        buckets = self.buffer.buckets
        while self._next < len(buckets):
            self._launch(buckets[self._next])
        for work in self._works:
            work.wait()
        self._works = []

    def abandon(self, watched):
        """After this rank's step raised (watched: whether watch() was called in that step): stops watching,
        without learning from the interrupted backward, launches every bucket of the step not launched yet, in
        order, as the other ranks do (what the buckets hold does not matter: no rank steps on them), and waits
        for all of them, so that no other rank waits for this one and nothing writes the buffer later."""
        if self._readiness is not None:
            self._readiness.abandon()
        if not watched:
            self._next, self._works = 0, []
        buckets = self.buffer.buckets
        while self._next < len(buckets):
            self._launch(buckets[self._next])
        for work in self._works:
            work.wait()
        self._works = []

    def remove(self):
        if self._readiness is not None:
            self._readiness.remove()
