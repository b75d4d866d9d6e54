"""Peak memory as the allocator sees it: the CUDA caching allocator's statistics, or on CPU (where
PyTorch keeps none) the profiler's record of every CPU allocation and free, summed in time order.
This is the ground truth that the LiveBytes tracker and the planner's predictions are checked
against."""

import contextlib
import gc
import os

import torch


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side logs start/stop lines to file descriptor 2; keep the table readable (around the
    profiler's start and stop only, never around the measured call)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_allocation_timeline(fn):
    """Runs fn() under the profiler and returns (timeline, ops): timeline lists (time in ns, bytes
    allocated through PyTorch's CPU allocator since the call began) after each allocation or free,
    in time order; ops are the profiler's other events (op names and spans). Buffers a library
    allocates itself (MKL's, oneDNN's) are not seen. Garbage is collected first: tensors of earlier
    work that a collection frees during the call would count as negative allocations and hide part
    of the call's peak."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # Only the profiler's own start and stop are silenced: fn's output (a user's loss_fn printing or warning,
    # memengine's own warnings) reaches stderr as it would without the measurement.
    with _stderr_silenced():
        prof.__enter__()
    try:
        fn()
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)
    events = prof.profiler.kineto_results.events()
    timeline, live = [], 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        timeline.append((event.start_ns(), live))
    return timeline, [e for e in events if e.name() != "[memory]"]


def _cpu_peak_extra_bytes(fn):
    """Peak of the bytes allocated through PyTorch's CPU allocator during the call (see
    cpu_allocation_timeline)."""
    timeline, _ = cpu_allocation_timeline(fn)
    return max((live for _, live in timeline), default=0)


def peak_extra_bytes(fn, device):
    """Bytes allocated beyond what was live before the call: the CUDA allocator's statistics, or
    on CPU (where PyTorch keeps none) the profiler's record of the CPU allocator."""
    if device.type != "cuda":
        return _cpu_peak_extra_bytes(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
