"""memengine.distributed.collectives.probe caches its finding per process group without keeping the group
alive: a destroyed group held until the interpreter exits had gloo's threads torn down during shutdown,
which aborted `python -m memengine info` about one run in six ("terminate called without an active
exception")."""

import gc
import weakref

import torch.distributed as dist

from memengine.distributed import collectives


def test_probe_caches_per_group_without_keeping_it_alive():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        paths = collectives.probe(group)
        assert set(paths) == {"reduce_scatter", "all_gather"}
        assert collectives.probe(group) is paths  # cached: a second probe issues no collective
        alive = weakref.ref(group)
    finally:
        dist.destroy_process_group()
    del group
    gc.collect()
    assert alive() is None, "the probe cache keeps a destroyed process group alive"


def test_forget_drops_the_cached_paths():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        first = collectives.probe(group)
        collectives.forget(group)
        assert collectives.probe(group) is not first  # probed again
    finally:
        dist.destroy_process_group()
