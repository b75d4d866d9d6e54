"""me.segment: applies a recompute plan in place to an nn.Sequential or to an nn.ModuleList whose
blocks the model calls in a loop (the Hugging Face decoder pattern).

Modules are not wrapped or moved (state_dict keys and parameters stay as they are): each block
of a recomputed or selective segment gets an instance-level forward, and the model calls every
block as usual (its own arguments, its forward pre-hooks). In a "recompute" segment the first
block's call opens a checkpoint.CheckpointFrame that the following blocks join, each recorded
with its arguments and chained to the previous block's output hidden state, so that only the
segment's input is kept and backward replays the calls in order (a hidden state changed between
two blocks of a segment is refused at forward time); in "selective" segments each block runs under
torch's selective activation checkpointing on its own, keeping its input and the outputs of
matmul-like ops and recomputing the rest right before its own backward (as plan's memory model
assumes). handle.remove() restores the original forwards.
"""

import contextlib
import functools
import warnings
import weakref

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memengine.segments.budget import normalize_budget
from memengine.segments.checkpoint import CheckpointFrame
from memengine.segments.model import check_plan
from memengine.segments.profile import SELECTIVE_KEPT_OPS, cuda_devices, hidden_state, profile, without_caches
from memengine.segments.solve import activation_budget, solve
from memengine.segments.state_protection import NoStateUpdates


def _keep_matmul_outputs(ctx, op, *args, **kwargs):
    name = op._schema.name if hasattr(op, "_schema") else str(op)
    if name in SELECTIVE_KEPT_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    """torch's selective-checkpoint contexts, with module state protected during recomputation
    as in me.checkpoint (BatchNorm statistics updated once)."""
    forward_context, recompute_context = create_selective_checkpoint_contexts(_keep_matmul_outputs)

    @contextlib.contextmanager
    def recompute():
        with NoStateUpdates(), recompute_context:  # torch's mode on top: it sees each op as in the forward
            yield

    return forward_context, recompute()


def _selective_checkpoint(fn, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)


class SegmentHandle:
    """What me.segment applied: .plan, .chain (the profile it was solved from, or None when the
    plan was given) and .remove()."""

    def __init__(self, blocks, plan, chain=None):
        self.blocks, self.plan, self.chain = blocks, plan, chain

    def remove(self):
        for block in self.blocks:
            for name in ("forward", "_memengine_original_forward"):
                block.__dict__.pop(name, None)


def _install(blocks, plan):
    for block in blocks:
        if "_memengine_original_forward" in block.__dict__:
            raise ValueError("segment: these blocks already carry a plan; call .remove() on its handle first")
    for segment in plan:
        for block in blocks[segment.start : segment.end]:
            block._memengine_original_forward = block.forward
        if segment.policy == "keep":
            continue
        if segment.policy == "recompute":
            _install_checkpoint(blocks[segment.start : segment.end], CheckpointFrame, first_index=segment.start)
        else:  # each block recomputes its own non-kept part right before its backward
            for block in blocks[segment.start : segment.end]:
                _install_checkpoint([block], _selective_checkpoint)


def _without_caches(args, kwargs):
    """A recomputed block must not write a key/value cache: its recomputation would write it a
    second time and read its own entries back. As Hugging Face does under gradient checkpointing,
    caching is switched off for the segment (with a warning); training does not use the cache.
    Caches are found by argument name and by type, keyword or positional (profile.without_caches)."""
    args, kwargs, switched = without_caches(args, kwargs)
    if switched:
        warnings.warn(
            f"me.segment: {', '.join(switched)} switched off for recomputed blocks: caching is incompatible with "
            "recomputation (pass use_cache=False when training)",
            stacklevel=2,
        )
    return args, kwargs


def _install_checkpoint(members, runner, first_index=0):
    """Gives each member a forward that the model calls as usual, with its own arguments (after
    its forward pre-hooks). runner=CheckpointFrame (a recomputed segment): the first member's call
    opens a frame and each following member joins it as a chained call, so that only the
    segment's input is kept and backward replays the calls in order; otherwise each member runs
    alone under `runner` (selective checkpointing). Without grad, members run plainly."""
    if runner is not CheckpointFrame:
        for block in members:

            def run_alone(*args, _block=block, **kwargs):
                if not torch.is_grad_enabled():
                    return _block._memengine_original_forward(*args, **kwargs)
                args, kwargs = _without_caches(args, kwargs)
                return runner(_block._memengine_original_forward, *args, **kwargs)

            block.forward = run_alone
        return

    # The segment's forward in progress, by weak reference (an early exit or an exception between
    # two members must not keep anything alive): the frame, the member that may join it next and
    # the hidden state that member must receive.
    progress = {"frame": lambda: None, "next": None, "hidden": lambda: None}

    def run_segment(*args, _position, **kwargs):
        block = members[_position]
        if not torch.is_grad_enabled():
            return block._memengine_original_forward(*args, **kwargs)
        args, kwargs = _without_caches(args, kwargs)
        frame, chain = progress["frame"](), None
        if _position == 0 or frame is None or progress["next"] != _position:
            frame = CheckpointFrame()  # the segment's first block (or one called out of order: on its own)
        elif not args or args[0] is not progress["hidden"]():
            progress["frame"] = lambda: None
            index = first_index + _position
            raise RuntimeError(
                f"me.segment: block {index} was not called with block {index - 1}'s output hidden state: it "
                "was changed between the two blocks (by the model or a forward pre-hook), which the "
                f"recomputation of their segment cannot replay. Put blocks {index - 1} and {index} in separate "
                "segments, or make the change inside a block"
            )
        else:
            chain = hidden_state  # recomputed from the previous block's recomputed output, not kept
        progress["frame"] = lambda: None  # an exception inside the call leaves no frame to join
        output = frame.call(block._memengine_original_forward, args, kwargs, chain=chain)
        hidden = hidden_state(output)
        if _position + 1 < len(members) and isinstance(hidden, torch.Tensor):
            progress.update(frame=weakref.ref(frame), next=_position + 1, hidden=weakref.ref(hidden))
        return output

    for position, block in enumerate(members):
        block.forward = functools.partial(run_segment, _position=position)


def segment(blocks, plan=None, budget=None, sample=None):
    """Applies `plan` (a list of memengine.plan.Segment), or the optimal plan for `budget` (the blocks'
    activations: bytes, a size such as "2GiB", or a share of them without recomputation such as "50%", as
    Engine(budget=) and `python -m memengine plan` take it) after profiling with `sample`, to `blocks` in
    place; returns a handle with .remove().

    sample: for an nn.Sequential, its input (a tensor or a tuple of arguments); for an
    nn.ModuleList, a zero-argument callable that runs one forward of the whole model (memengine
    records how each block is called)."""
    blocks = list(blocks)
    chain = None
    if plan is None:
        if budget is None or sample is None:
            raise ValueError("segment: pass a plan, or a budget together with a sample to profile")
        budget = normalize_budget(budget)
        chain = profile_sample(blocks, sample)
        plan = solve(chain, activation_budget(chain, budget))
    check_plan(range(len(blocks)), plan)
    _install(blocks, plan)
    return SegmentHandle(blocks, plan, chain)


def profile_sample(blocks, sample):
    """The chain of `blocks` profiled with `sample` (see segment()). The sample forward leaves
    no trace: its in-place writes to existing tensors (every module's BatchNorm statistics, not
    only the blocks') go to copies, and the global random number generators (CPU, and the
    blocks' CUDA devices) are restored after it, as profile() restores them after profiling."""
    if not callable(sample):
        return profile(blocks, *(sample if isinstance(sample, tuple) else (sample,)))
    calls = []
    hooks = [
        block.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
        for block in blocks
    ]
    tensors = [t for block in blocks for t in [*block.parameters(), *block.buffers()]]
    devices = [device.index for device in cuda_devices(tensors)]
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"), torch.no_grad(), NoStateUpdates():
            sample()
    finally:
        for hook in hooks:
            hook.remove()
    if len(calls) != len(blocks):
        raise ValueError(f"segment: the sample forward called the blocks {len(calls)} times, expected {len(blocks)}")
    args, kwargs = calls[0]
    return profile(blocks, *args, **kwargs)  # profile detaches and requires grad as in training


def repeated_blocks(model):
    """The model's largest nn.ModuleList whose modules all have the same type (a transformer's
    layers), for planning when no blocks are named."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1
    ]
    if not lists:
        raise ValueError(f"no list of repeated blocks found in {type(model).__name__}: name them (blocks=model.layers)")
    return max(lists, key=len)
