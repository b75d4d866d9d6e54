"""me.checkpoint: activation checkpointing on saved-tensor hooks, a drop-in for
torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs), and CheckpointFrame,
the same machinery for a computation made of several calls (me.segment's recomputed segments).

During the forward, every tensor autograd would save is replaced by its position in the order
of saving, and nothing is kept. The first time backward needs one of them, the recorded calls run
again (same inputs, same RNG state, same autocast state, each call with the state it started with)
under hooks that collect the tensors saved in that same order, stopping as soon as the last one
needed is there (early stop; off with early_stop=False or torch.utils.checkpoint.
set_checkpoint_early_stop(False)). Because nothing depends on how `fn` is written, kwargs, nested
structures, non-tensor outputs, torch.autograd.grad, backward(inputs=...), inputs that do not
require grad, nested checkpoints and functions that differentiate inside (a gradient penalty;
higher-order gradients) all work.

torch's keywords have torch's meaning: preserve_rng_state, context_fn (forward and recomputation
contexts, e.g. torch's selective checkpointing), determinism_check ("default" compares the shape,
dtype and device of every recomputed tensor with the forward's and raises CheckpointError; "none"),
debug (also compares values; torch.utils.checkpoint.set_checkpoint_debug_enabled is honoured),
early_stop, respect_saved_tensors_hooks (True is refused); use_reentrant=True is refused (only the non-reentrant
variant exists). A recomputation that saves fewer tensors than the forward, or more with early stop
off, raises CheckpointError as in torch. A saved tensor that does not require grad comes back as
the same object.

Differences from torch, on purpose:
- The recomputation does not update module state a second time: in-place writes to tensors that
  existed before it started (BatchNorm's running statistics and num_batches_tracked) go to
  throwaway copies, so a checkpointed BatchNorm ends up exactly as without checkpointing. This
  costs a Python call per recomputed op, so it is skipped when fn is a module, a module's method
  or receives modules and the forward changed none of their parameters and buffers nor fn's
  tensor arguments (version counters); state kept in anything else must be in those.
- A saved tensor read a second time in one backward (ctx.saved_tensors twice) is recomputed
  again; torch raises.
- use_reentrant may be omitted without a warning: it means use_reentrant=False.
- Fused gradient accumulation (memengine.nn.Linear into main_grad) happens once per backward: the
  recomputed graph is differentiated only by fn's own torch.autograd.grad calls.
"""

import contextlib

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._pytree import tree_flatten

from memengine.segments.state_protection import NoStateUpdates, state_tensors

DETERMINISM_CHECKS = ("default", "none")
# torch.utils.checkpoint.GraphExecGroup (torch >= 2.14): backward passes grouped to share one
# recomputation. Older torch has no such groups: each graph task recomputes.
_GRAPH_EXEC_GROUP = getattr(torch_checkpoint, "GraphExecGroup", None)


class CheckpointError(RuntimeError):
    """The recomputation did not reproduce the forward."""


class _StopRecompute(Exception):
    """Raised inside the recomputation once every needed tensor has been collected."""


class _Call:
    """One recorded call of a frame, with the state it started in."""

    __slots__ = ("args", "autocast", "chain", "fn", "kwargs", "rng")

    def __init__(self, fn, args, kwargs, chain, rng):
        self.fn, self.kwargs, self.chain, self.rng = fn, kwargs, chain, rng
        self.args = args[1:] if chain is not None else args  # a chained first argument is not kept
        self.autocast = {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if device == "cpu" or torch.cuda.is_available()
        }

    def replay(self, previous_output):
        if self.rng is not None:
            cpu_state, cuda_devices, cuda_states = self.rng
            torch.set_rng_state(cpu_state)
            for device, state in zip(cuda_devices, cuda_states, strict=True):
                torch.cuda.set_rng_state(state, device)
        args = self.args if self.chain is None else (self.chain(previous_output), *self.args)
        with contextlib.ExitStack() as stack:
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            return self.fn(*args, **self.kwargs)


def _rng_state(leaves):
    cuda_devices = sorted({t.device.index or 0 for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda})
    return torch.get_rng_state(), cuda_devices, [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _metadata(tensor):
    return tuple(tensor.shape), tensor.dtype, tensor.device


def _describe(metadata):
    shape, dtype, device = metadata
    return f"{shape} {dtype} {device}"


def _identity(tensor):
    return tensor


class CheckpointFrame:
    """A checkpoint over one or more calls, recomputed together from their recorded inputs.

    frame = CheckpointFrame(early_stop=True, ...)              # torch's options, see checkpoint()
    out = frame.call(fn, args, kwargs)                         # runs fn now; keeps args, not what fn saves
    out2 = frame.call(g, (hidden, m), {}, chain=hidden_state)  # hidden is chain(out): recomputed, not kept

    Only what autograd saves inside the calls belongs to the frame: code between two calls keeps
    its tensors as usual. A chained call's first argument must be chain(previous call's output)
    (the caller checks); the recomputation feeds it chain(previous recomputed output). Every call
    replays with the RNG and autocast state it started with; the caller's RNG state is restored
    afterwards."""

    def __init__(
        self,
        *,
        preserve_rng_state=True,
        determinism_check="default",
        debug=False,
        early_stop=True,
        recompute_context=None,
    ):
        if determinism_check not in DETERMINISM_CHECKS:
            raise ValueError(
                f"checkpoint: determinism_check must be one of {', '.join(map(repr, DETERMINISM_CHECKS))} "
                f"(as in torch), got {determinism_check!r}"
            )
        self.preserve_rng_state, self.debug, self.early_stop = preserve_rng_state, debug, early_stop
        self.recompute_context = recompute_context if recompute_context is not None else contextlib.nullcontext()
        self.calls = []
        self.count = 0  # tensors saved by the forward
        self.metadata = [] if determinism_check == "default" or debug else None  # per saved tensor
        self.originals = []  # (tensor, label) per saved tensor, debug mode only
        self.recomputed = None  # per saved tensor, until backward takes it
        self.task = None  # the backward (graph task or GraphExecGroup) the recomputation was made for
        self.reproduced = 0  # tensors the last recomputation saved
        self.running = 0  # calls whose forward is still running (a backward inside one sees a prefix)
        self.protect_state = False  # recompute under NoStateUpdates (see the module docstring)

    # Under torch.compile the call runs eagerly: a compiled region saves other tensors, in another
    # order, than the eager recomputation in backward would reproduce (the metadata check then fails).
    # torch._disable_dynamo is torch.compiler.disable with torch._dynamo imported at the first call, not
    # at `import memengine` (1 s of import time, issue 19); torch's own optimizers use it alike.
    @torch._disable_dynamo
    def call(self, fn, args, kwargs, *, chain=None, context=None):
        """Runs fn(*args, **kwargs) as the frame's next call (under `context` too) and returns its output."""
        leaves = tree_flatten((args, kwargs))[0]
        self.calls.append(_Call(fn, args, kwargs, chain, _rng_state(leaves) if self.preserve_rng_state else None))
        state = state_tensors(fn, leaves)
        versions = None if state is None else [t._version for t in state]
        self.running += 1
        try:
            with (
                torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack),
                context or contextlib.nullcontext(),
            ):
                output = fn(*args, **kwargs)
        finally:
            self.running -= 1
        # Protecting state during the recomputation costs a Python call per op: only where the
        # forward wrote a tensor that could hold state (or where that cannot be ruled out).
        if not self.protect_state:
            self.protect_state = versions is None or any(t._version != v for t, v in zip(state, versions, strict=True))
        return output

    # forward: remember positions only
    def _pack(self, tensor):
        index = self.count
        self.count += 1
        if self.metadata is not None:
            self.metadata.append(_metadata(tensor))
        if self.debug:
            label = type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "an input or parameter"
            self.originals.append((tensor.detach(), label))
        return index

    def _unpack(self, index):
        group = _GRAPH_EXEC_GROUP._get_current_group() if _GRAPH_EXEC_GROUP is not None else None
        task = group if group is not None else torch._C._current_graph_task_id()
        if self.recomputed is None or task != self.task or index >= len(self.recomputed):
            self.task = task  # the first need in this backward
            self._recompute(self.count)
        elif self.recomputed[index] is None:  # needed a second time in this backward (ctx.saved_tensors read twice)
            self._recompute(index + 1, only=index)
        tensor = self.recomputed[index]
        self.recomputed[index] = None  # autograd's node holds it now and frees it once it has run
        return tensor

    def _recompute(self, needed, only=None):
        """Replays the calls until they have saved `needed` tensors; keeps them all, or just tensor `only`."""
        if self.recomputed is None or only is None:
            self.recomputed = [None] * needed
        self.reproduced = 0
        forward_complete = self.running == 0

        def collect(tensor):
            index = self.reproduced
            self.reproduced += 1
            kept = tensor.detach() if tensor.requires_grad else tensor  # keeps the identity of the others
            if index < needed:
                if only is None or index == only:
                    self.recomputed[index] = kept
            elif forward_complete:  # (a backward inside a running forward needs a prefix: more is expected)
                raise CheckpointError(
                    "checkpoint: trying to save more tensors during recomputation than during the original "
                    f"forward pass ({self.count}); the function must run the same operations on every call"
                )
            if self.early_stop and self.reproduced >= needed:
                raise _StopRecompute  # everything needed is here: skip the rest
            return kept  # fn may differentiate its own recomputed graph (a gradient penalty)

        with contextlib.ExitStack() as stack:
            if self.preserve_rng_state:
                devices = sorted({device for call in self.calls for device in call.rng[1]})
                stack.enter_context(torch.random.fork_rng(devices=devices))  # the caller's state comes back
            stack.enter_context(torch.enable_grad())
            if self.protect_state:
                stack.enter_context(NoStateUpdates())
            stack.enter_context(self.recompute_context)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(collect, _identity))
            try:
                output = None
                for call in self.calls:
                    output = call.replay(output)
            except _StopRecompute:
                pass
        self._check(needed, only)

    def _check(self, needed, only):
        if self.reproduced < needed:
            raise CheckpointError(
                "checkpoint: A different number of tensors was saved during the original forward and "
                f"recomputation ({self.count} and {self.reproduced}); the function must run the same operations "
                "on every call"
            )
        if self.metadata is not None:
            indices = range(needed) if only is None else (only,)
            differing = [i for i in indices if _metadata(self.recomputed[i]) != self.metadata[i]]
            if differing:
                details = "; ".join(
                    f"tensor {i}: forward {_describe(self.metadata[i])}, "
                    f"recomputed {_describe(_metadata(self.recomputed[i]))}"
                    for i in differing
                )
                raise CheckpointError(
                    "checkpoint: Recomputed values for the following tensors have different metadata than during "
                    f"the forward pass: {details}. The function must run the same operations on every call "
                    "(determinism_check='none' switches this check off)"
                )
        if self.debug and only is None and self.running == 0:
            self._compare()

    def _compare(self):
        for index, ((original, label), again) in enumerate(zip(self.originals, self.recomputed, strict=True)):
            if not torch.equal(original, again):
                raise CheckpointError(
                    f"checkpoint(debug=True): recomputed tensor {index} (saved by {label}) differs from the "
                    f"forward's: max difference {(original.double() - again.double()).abs().max().item()}. "
                    "Non-determinism (an unseeded random op, a nondeterministic kernel) or state the function "
                    "reads and changes makes recomputation unsafe."
                )


def _torch_switch(name, value):
    """torch.utils.checkpoint's global switches (set_checkpoint_early_stop, set_checkpoint_debug_enabled)
    win over the keyword, as in torch."""
    switch = getattr(torch_checkpoint, name, None)
    return value if switch is None else switch


def checkpoint(
    fn,
    *args,
    use_reentrant=None,
    preserve_rng_state=True,
    context_fn=torch_checkpoint.noop_context_fn,
    determinism_check="default",
    debug=False,
    early_stop=True,
    respect_saved_tensors_hooks=None,
    **kwargs,
):
    """Runs fn(*args, **kwargs) without keeping the tensors autograd would save; backward
    recomputes them. torch.utils.checkpoint.checkpoint's keywords, with its meaning; see the module
    docstring."""
    if use_reentrant:
        raise ValueError(
            "me.checkpoint: use_reentrant=True is not supported (checkpointing is only supported when "
            "use_reentrant=False here): pass use_reentrant=False or omit it, or call "
            "torch.utils.checkpoint.checkpoint for the reentrant variant"
        )
    frame = CheckpointFrame(
        preserve_rng_state=preserve_rng_state,
        determinism_check=determinism_check,
        debug=_torch_switch("_checkpoint_debug_enabled", debug),
        early_stop=_torch_switch("_enable_checkpoint_early_stop", early_stop),
    )
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    forward_context, frame.recompute_context = context_fn()
    if hasattr(forward_context, "respect_saved_tensors_hooks"):  # torch's selective checkpointing
        if respect_saved_tensors_hooks:
            raise ValueError(
                "me.checkpoint: respect_saved_tensors_hooks=True is not supported (torch would route the tensors "
                "selective checkpointing caches through saved-tensor hooks around the checkpoint, which memengine "
                "cannot reach); omit it, or call torch.utils.checkpoint.checkpoint"
            )
        # What it caches bypasses saved-tensor hooks (torch's default); saying so silences torch's
        # warning about this frame's own hooks.
        forward_context.respect_saved_tensors_hooks = False
    return frame.call(fn, args, kwargs, context=forward_context)
