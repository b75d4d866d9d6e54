"""me.checkpoint: activation checkpointing on saved-tensor hooks, a drop-in for
torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs).

During the forward, every tensor autograd would save is replaced by its position in the order
of saving, and nothing is kept. The first time backward needs one of them, `fn` runs again
(same inputs, same RNG state, same autocast state) under hooks that collect the tensors saved
in that same order, stopping as soon as the last one needed is there. Because nothing depends
on how `fn` is written, kwargs, nested structures, non-tensor outputs, torch.autograd.grad,
backward(inputs=...), inputs that do not require grad and nested checkpoints all work.

Beyond torch:
- The recomputation does not update module state a second time: in-place writes to tensors that
  existed before it started (BatchNorm's running statistics and num_batches_tracked) go to
  throwaway copies, so a checkpointed BatchNorm ends up exactly as without checkpointing. This
  costs a Python call per recomputed op, so it is skipped when fn is a module, a module's method
  or receives modules and the forward changed none of their parameters and buffers nor fn's
  tensor arguments (version counters); state kept in anything else must be in those.
- Fused gradient accumulation (memengine.nn.Linear into main_grad) happens once per backward,
  because the recomputed graph is never differentiated.
- debug=True keeps the original tensors and compares each recomputed one with it by value,
  raising CheckpointError that names the first one that differs (the op that made it).
"""

import contextlib

import torch
from torch.utils._pytree import tree_flatten

from memengine.segments.state_protection import NoStateUpdates, state_tensors


class CheckpointError(RuntimeError):
    """The recomputation did not reproduce the forward."""


class _StopRecompute(Exception):
    """Raised inside the recomputation once every needed tensor has been collected."""


class _Frame:
    def __init__(self, fn, args, kwargs, leaves, preserve_rng_state, debug):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.debug = debug
        self.count = 0  # tensors saved by the forward
        self.originals = []  # (tensor, label) per saved tensor, debug mode only
        self.recomputed = None  # per saved tensor, until backward takes it
        self.task = None  # the backward (graph task) the recomputation was made for
        self.reproduced = 0  # tensors the last recomputation saved
        self.protect_state = True  # recompute under _NoStateUpdates (see checkpoint())
        self.autocast = {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if device == "cpu" or torch.cuda.is_available()
        }
        self.rng = None
        if preserve_rng_state:
            cuda_devices = sorted({t.device.index or 0 for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda})
            self.rng = (
                torch.get_rng_state(),
                cuda_devices,
                [torch.cuda.get_rng_state(d) for d in cuda_devices],
            )

    # forward: remember positions only
    def pack(self, tensor):
        index = self.count
        self.count += 1
        if self.debug:
            label = type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "an input or parameter"
            self.originals.append((tensor.detach(), label))
        return index

    def unpack(self, index):
        task = torch._C._current_graph_task_id()
        if self.recomputed is None or task != self.task:  # the first need in this backward
            self.task = task
            self._recompute(self.count)
        elif self.recomputed[index] is None:  # needed a second time in this backward (ctx.saved_tensors read twice)
            self._recompute(index + 1, only=index)
        tensor = self.recomputed[index]
        if tensor is None:
            raise CheckpointError(
                f"checkpoint: saved tensor {index} was not reproduced by the recomputation (it saved "
                f"{self.reproduced} of {self.count}); the function must run the same operations on every call"
            )
        self.recomputed[index] = None  # autograd's node holds it now and frees it once it has run
        return tensor

    def _recompute(self, needed, only=None):
        """Reruns fn until it has saved `needed` tensors; keeps them all, or just tensor `only`."""
        if self.recomputed is None or only is None:
            self.recomputed = [None] * self.count
        self.reproduced = 0

        def collect(tensor):
            if only is None or self.reproduced == only:
                self.recomputed[self.reproduced] = tensor.detach()
            self.reproduced += 1
            if self.reproduced >= needed:
                raise _StopRecompute  # everything needed is here: skip the rest of fn
            return None

        with contextlib.ExitStack() as stack:
            if self.rng is not None:
                cpu_state, cuda_devices, cuda_states = self.rng
                stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
                torch.set_rng_state(cpu_state)
                for device, state in zip(cuda_devices, cuda_states, strict=True):
                    torch.cuda.set_rng_state(state, device)
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            if self.protect_state:
                stack.enter_context(NoStateUpdates())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(collect, _never_unpacked))
            try:
                self.fn(*self.args, **self.kwargs)
            except _StopRecompute:
                pass
        if self.debug and only is None:
            self._compare()

    def _compare(self):
        for index, ((original, label), again) in enumerate(zip(self.originals, self.recomputed, strict=True)):
            same = (
                again is not None
                and original.shape == again.shape
                and original.dtype == again.dtype
                and torch.equal(original, again)
            )
            if not same:
                detail = "missing" if again is None else f"max difference {_max_difference(original, again)}"
                raise CheckpointError(
                    f"checkpoint(debug=True): recomputed tensor {index} (saved by {label}) differs from the "
                    f"forward's: {detail}. Non-determinism (an unseeded random op, a nondeterministic kernel) "
                    "or state the function reads and changes makes recomputation unsafe."
                )


def _max_difference(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"
    return (a.double() - b.double()).abs().max().item()


def _never_unpacked(_):
    raise CheckpointError("checkpoint: the recomputed graph is not meant to be differentiated")


def checkpoint(fn, *args, preserve_rng_state=True, debug=False, **kwargs):
    """Runs fn(*args, **kwargs) without keeping the tensors autograd would save; backward
    recomputes them. See the module docstring."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    leaves = tree_flatten((args, kwargs))[0]
    frame = _Frame(fn, args, kwargs, leaves, preserve_rng_state, debug)
    state = state_tensors(fn, leaves)
    versions = None if state is None else [t._version for t in state]
    with torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
        output = fn(*args, **kwargs)
    # Protecting state during the recomputation costs a Python call per op: skip it when the
    # forward wrote none of the tensors that could hold state.
    frame.protect_state = versions is None or any(t._version != v for t, v in zip(state, versions, strict=True))
    return output
