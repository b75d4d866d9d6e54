"""The collectives data parallelism issues, with fallbacks for backends that lack one.

Every call goes through the `torch.distributed` module attribute at call time (dist.all_reduce,
not a name imported once), so that a wrapper installed around torch.distributed sees it.

The single-tensor reduce-scatter and all-gather (reduce_scatter_single / all_gather_single, before
torch 2.14 reduce_scatter_tensor / all_gather_into_tensor) are missing from some backend versions
(older gloo). Which path runs is probed once per process group (a tiny collective of each kind; every
rank must probe, in the same order, as for any collective) and can be forced with
MEMENGINE_COLLECTIVES=native|fallback. Fallbacks: reduce-scatter as an all-reduce of the whole
bucket (twice the traffic; the shard is then read out of it), all-gather as all_gather into a
list of shard-sized tensors and a copy back.
"""

import os
import weakref

import torch
import torch.distributed as dist

ENV_VAR = "MEMENGINE_COLLECTIVES"
NATIVE, FALLBACK = "native", "fallback"
# process group (held weakly: the cache must not keep a destroyed group alive) -> device type ->
# {"reduce_scatter": NATIVE|FALLBACK, "all_gather": ...}
_paths = weakref.WeakKeyDictionary()


def probe(group, device=None):
    """{"reduce_scatter": path, "all_gather": path} for `group` with tensors on `device` (default: the
    group's own device: the current CUDA device for NCCL, else the CPU): a collective of each kind on a
    few elements, once per group and device type (cached). A collective: call it on every rank."""
    device = _device_of(group) if device is None else torch.device(device)
    cached = _paths.get(group, {}).get(device.type)
    if cached is not None:
        return cached
    forced = os.environ.get(ENV_VAR, "auto")
    if forced not in ("auto", NATIVE, FALLBACK):
        raise ValueError(f"{ENV_VAR} must be auto, native or fallback, got {forced!r}")
    world = dist.get_world_size(group)
    paths = {}
    for name, run in (("reduce_scatter", _try_reduce_scatter), ("all_gather", _try_all_gather)):
        if forced != "auto":
            paths[name] = forced
            continue
        try:
            run(group, world, device)
            paths[name] = NATIVE
        except (RuntimeError, NotImplementedError, ValueError, AttributeError):
            paths[name] = FALLBACK
    _paths.setdefault(group, {})[device.type] = paths
    return paths


def forget(group):
    """Drops what probe() cached for `group` (before the group is destroyed: the cache would otherwise keep
    the destroyed group alive until the interpreter exits, and gloo's threads torn down then can abort it)."""
    _paths.pop(group, None)


def _device_of(group):
    """Where the group's collectives run: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_scatter_function():
    """torch.distributed's single-tensor reduce-scatter (reduce_scatter_single since torch 2.14, which
    deprecates the older name reduce_scatter_tensor), looked up at call time."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_function():
    """all_gather_single (torch >= 2.14) or all_gather_into_tensor, looked up at call time."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _try_reduce_scatter(group, world, device):
    data = torch.ones(world, device=device)
    rank = dist.get_rank(group)
    reduce_scatter_function()(data[rank : rank + 1], data, group=group)


def _try_all_gather(group, world, device):
    data = torch.zeros(world, device=device)
    rank = dist.get_rank(group)
    all_gather_function()(data, data[rank : rank + 1].clone(), group=group)


class _Done:
    """A finished collective's work handle, or one whose completion runs a follow-up (the fallbacks)."""

    def __init__(self, work=None, then=None):
        self.work, self.then = work, then

    def wait(self):
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.then is not None:
            self.then()
            self.then = None


def all_reduce(tensor, group):
    """Asynchronous SUM all-reduce in place; returns a handle with wait()."""
    return _Done(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True))


def reduce_scatter_in_place(bucket, group, path):
    """Asynchronous SUM reduce-scatter of `bucket` (a 1-D view whose length the world size divides):
    afterwards this rank's shard of it, bucket.chunk(world)[rank], holds the sum over ranks (the
    rest of the bucket is left undefined). Returns a handle with wait()."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = bucket.numel() // world
    if path == NATIVE:
        output = bucket[rank * shard : (rank + 1) * shard]
        return _Done(reduce_scatter_function()(output, bucket, op=dist.ReduceOp.SUM, group=group, async_op=True))
    return all_reduce(bucket, group)  # the whole bucket is summed; the shard is part of it


def all_gather_in_place(bucket, group, path):
    """Asynchronous all-gather: every rank's shard of `bucket` (bucket.chunk(world)[rank], already
    filled on that rank) into `bucket` on every rank. Returns a handle with wait()."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = bucket.numel() // world
    own = bucket[rank * shard : (rank + 1) * shard]
    if path == NATIVE:
        return _Done(all_gather_function()(bucket, own.clone(), group=group, async_op=True))
    parts = [torch.empty_like(own) for _ in range(world)]
    work = dist.all_gather(parts, own.contiguous(), group=group, async_op=True)
    return _Done(work, then=lambda: torch.cat(parts, out=bucket))
