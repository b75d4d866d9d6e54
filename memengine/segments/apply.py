"""me.segment: applies a recompute plan in place to an nn.Sequential or to an nn.ModuleList whose
blocks the model calls in a loop (the Hugging Face decoder pattern).

Modules are not wrapped or moved (state_dict keys and parameters stay as they are): the first
block of each recomputed or selective segment gets an instance-level forward that runs the
whole segment (each block with the hidden state of the previous one and the call's other
arguments) under checkpointing, and the segment's other blocks get a forward that hands that
result on. "recompute" segments use me.checkpoint; in "selective" segments each block runs under
torch's selective activation checkpointing on its own, keeping its input and the outputs of
matmul-like ops and recomputing the rest right before its own backward (as plan's memory model
assumes). handle.remove() restores the original forwards.
"""

import contextlib
import warnings

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from memengine.segments.checkpoint import checkpoint
from memengine.segments.model import check_plan
from memengine.segments.profile import SELECTIVE_KEPT_OPS, hidden_state, profile
from memengine.segments.solve import solve
from memengine.segments.state_protection import NoStateUpdates


def _run_blocks(blocks, hidden, args, kwargs):
    """Runs blocks one after the other; each gets the previous hidden state plus args/kwargs."""
    output = None
    for block in blocks:
        output = block._memengine_original_forward(hidden, *args, **kwargs)
        hidden = hidden_state(output)
    return output


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
            for name in ("forward", "_memengine_original_forward", "_memengine_segment_output"):
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
            _install_checkpoint(blocks[segment.start : segment.end], checkpoint)
        else:  # each block recomputes its own non-kept part right before its backward
            for block in blocks[segment.start : segment.end]:
                _install_checkpoint([block], _selective_checkpoint)


# Key/value-cache arguments of Hugging Face decoder layers, and their "off" values.
_CACHE_ARGUMENTS = {"use_cache": False, "past_key_value": None, "past_key_values": None, "layer_past": None}


def _without_caches(kwargs):
    """A recomputed block must not write a key/value cache: its recomputation would write it a
    second time and read its own entries back. As Hugging Face does under gradient checkpointing,
    caching is switched off for the segment (with a warning); training does not use the cache."""
    on = [name for name, off in _CACHE_ARGUMENTS.items() if kwargs.get(name, off) is not off]  # singletons
    if not on:
        return kwargs
    warnings.warn(
        f"me.segment: {', '.join(on)} switched off for recomputed blocks: caching is incompatible with "
        "recomputation (pass use_cache=False when training)",
        stacklevel=2,
    )
    return {**kwargs, **{name: _CACHE_ARGUMENTS[name] for name in on}}


def _install_checkpoint(members, runner):
    """The first member's forward runs all members under `runner`; the others hand its result on."""
    head, rest = members[0], members[1:]

    def run_segment(hidden, *args, **kwargs):
        if torch.is_grad_enabled():
            kwargs = _without_caches(kwargs)
        output = runner(_run_blocks, members, hidden, args, kwargs)
        for block in rest:
            block._memengine_segment_output = output
        return output

    head.forward = run_segment
    for block in rest:

        def hand_on(*args, _block=block, **kwargs):
            # The segment's first block already ran this one: return what the segment produced.
            return _block.__dict__.pop("_memengine_segment_output")

        block.forward = hand_on


def segment(blocks, plan=None, budget=None, sample=None):
    """Applies `plan` (a list of memengine.plan.Segment), or the optimal plan for `budget` bytes
    after profiling with `sample`, to `blocks` in place; returns a handle with .remove().

    sample: for an nn.Sequential, its input (a tensor or a tuple of arguments); for an
    nn.ModuleList, a zero-argument callable that runs one forward of the whole model (memengine
    records how each block is called)."""
    blocks = list(blocks)
    chain = None
    if plan is None:
        if budget is None or sample is None:
            raise ValueError("segment: pass a plan, or a budget together with a sample to profile")
        chain = profile_sample(blocks, sample)
        plan = solve(chain, budget)
    check_plan(range(len(blocks)), plan)
    _install(blocks, plan)
    return SegmentHandle(blocks, plan, chain)


def profile_sample(blocks, sample):
    if not callable(sample):
        return profile(blocks, *(sample if isinstance(sample, tuple) else (sample,)))
    calls = []
    hooks = [
        block.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
        for block in blocks
    ]
    try:
        with torch.no_grad():
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
