"""profile(): measures a chain of blocks for the planner (bytes saved, selective bytes, forward
and backward temporaries, FLOPs and time), on a real device or on meta (modelled), without side
effects on the blocks or the global random number generators. Key/value caches (Hugging Face's
past_key_values) are switched off while profiling: planning is for training, which does not use
them (without_caches recognises them)."""

import dataclasses
import statistics
import time as _time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from memengine.segments.live_bytes import LiveBytes
from memengine.segments.model import Chain

# Ops whose outputs the "selective" policy keeps (the expensive ones to recompute).
SELECTIVE_KEPT_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::convolution",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
    }
)
# Time model on the meta device (no kernels run): matmul-like ops at this rate in FLOP/s, all
# other ops at this rate in bytes written per second. Only ratios matter to the solver.
META_FLOPS_PER_SECOND = 100e12
META_BYTES_PER_SECOND = 1e12


def _storage_key(t):
    return t.untyped_storage()._cdata


# Key/value-cache arguments of Hugging Face decoder layers by name, and their "off" values. Cache
# objects under other names (`cache`) or passed positionally (GPT-2's layer_past) are recognised
# by type (is_key_value_cache).
CACHE_ARGUMENTS = {"use_cache": False, "past_key_value": None, "past_key_values": None, "layer_past": None}


def is_key_value_cache(value):
    """Whether `value` is a Hugging Face key/value cache: an instance of a class named Cache
    defined in the transformers package (found through its class hierarchy, so that
    transformers need not be imported)."""
    return any(
        klass.__name__ == "Cache" and klass.__module__.partition(".")[0] == "transformers"
        for klass in type(value).__mro__
    )


def without_caches(args, kwargs):
    """(args, kwargs, switched): the call's arguments with key/value caching switched off (the
    named arguments of CACHE_ARGUMENTS set to their off values, any cache object to None) and
    the names of what was on ("positional argument i (its type)" for a cache passed by position)."""
    switched = [name for name, off in CACHE_ARGUMENTS.items() if kwargs.get(name, off) is not off]  # singletons
    switched += [name for name, value in kwargs.items() if name not in CACHE_ARGUMENTS and is_key_value_cache(value)]
    positions = [(i, value) for i, value in enumerate(args) if is_key_value_cache(value)]
    if not switched and not positions:
        return args, kwargs, []
    args = tuple(None if is_key_value_cache(value) else value for value in args)
    kwargs = {**kwargs, **{name: CACHE_ARGUMENTS.get(name) for name in switched}}
    return args, kwargs, switched + [f"positional argument {i} ({type(value).__name__})" for i, value in positions]


def cuda_devices(tensors):
    """The CUDA devices the tensors are on, in order."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=lambda device: device.index)


def synchronizer(devices):
    """A function that waits for the work queued on the CUDA `devices` (kernels are launched
    asynchronously: a clock read right after a launch measures the launch, not the kernel), or
    None when there are none (CPU ops have finished when they return: nothing to wait for)."""
    devices = list(devices)
    if not devices:
        return None

    def synchronize():
        for device in devices:
            torch.cuda.synchronize(device)

    return synchronize


class _OpRecorder(TorchDispatchMode):
    """Records the bytes of the outputs of matmul-like ops (what selective checkpointing caches,
    whether autograd saves them or not) and the time spent in those ops and in the others
    (measured, or modelled on the meta device). `synchronize` (see synchronizer) waits for the
    device before and after each measured op, so that each op's time is its own."""

    def __init__(self, measure, synchronize=None):
        super().__init__()
        self.measure = measure
        self.synchronize = synchronize if measure else None
        self.kept = {}  # storage key -> weak reference to a matmul-like output on that storage
        self.kept_bytes = 0  # bytes of their distinct storages
        self.kept_time = 0.0
        self.other_time = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.synchronize is not None:
            self.synchronize()
        start = _time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.synchronize is not None:
            self.synchronize()
        elapsed = _time.perf_counter() - start
        name = func._schema.name
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        kept = name in SELECTIVE_KEPT_OPS
        if not self.measure:
            formula = flop_registry.get(func._overloadpacket)
            if kept and formula is not None:
                elapsed = formula(*args, **(kwargs or {}), out_val=out) / META_FLOPS_PER_SECOND
            else:
                elapsed = sum(t.numel() * t.element_size() for t in outputs) / META_BYTES_PER_SECOND
        if kept:
            self.kept_time += elapsed
        else:
            self.other_time += elapsed
        for t in outputs if kept else ():
            key = _storage_key(t)
            if key not in self.kept or self.kept[key]() is None:  # new (a freed storage's address is reused)
                self.kept_bytes += t.untyped_storage().nbytes()
            self.kept[key] = weakref.ref(t)
        return out


def _tensor_bytes(value):
    return sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def hidden_state(output):
    """What the next block receives: the output, or the first element of a tuple output."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _drop_gradient(tensor):
    tensor.grad = None


def _median_seconds(fn, synchronize=None, repeats=3):
    """Median wall time of fn() after a warm-up; `synchronize` (see synchronizer) waits for the
    device before the clock starts and before it stops."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        if synchronize is not None:
            synchronize()
        begin = _time.perf_counter()
        fn()
        if synchronize is not None:
            synchronize()
        samples.append(_time.perf_counter() - begin)
    return statistics.median(samples)


def _profile_block(block, args, kwargs, measure, synchronize):
    """Runs one block forward and backward on its own and measures it (see profile()); times are
    taken with `synchronize` (see synchronizer) around each timed run. The block
    runs on detached copies of its parameters and input whose gradients are dropped as soon as
    they are accumulated, so the user's .grad, main_grad and gradient hooks are left alone."""
    leaves = {name: p.detach().requires_grad_(p.requires_grad) for name, p in block.named_parameters()}
    hidden = args[0].detach().requires_grad_(args[0].is_floating_point())
    for leaf in [hidden, *leaves.values()]:
        if leaf.requires_grad:
            leaf.register_post_accumulate_grad_hook(_drop_gradient)
    args = (hidden, *args[1:])
    # Parameters and the other arguments (masks, position embeddings) are shared by the blocks
    # and alive anyway: not counted as saved.
    shared = {
        _storage_key(t) for t in [*leaves.values(), *tree_flatten((args[1:], kwargs))[0]] if isinstance(t, torch.Tensor)
    }
    saved = {}  # storage key -> bytes
    recorder = _OpRecorder(measure, synchronize)
    counter = FlopCounterMode(display=False)
    at_last_save = (0, 0.0)  # FLOPs and time done when autograd saved its last tensor

    def pack(t):
        nonlocal at_last_save
        key = _storage_key(t)
        if key not in shared:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        at_last_save = (counter.get_total_flops(), recorder.kept_time + recorder.other_time)
        return t

    def run():
        return torch.func.functional_call(block, leaves, args, kwargs)

    with LiveBytes() as live:
        with counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
                output = run()
        forward_extra = live.peak - live.mark()
        target = hidden_state(output)
        backward_extra = 0
        if target.requires_grad:
            gradient = torch.ones_like(target)
            before = live.mark()
            torch.autograd.backward(target, gradient)
            backward_extra = live.window_peak - before
    # Selective checkpointing holds the block's input and every matmul-like output.
    selective = _tensor_bytes(hidden) + recorder.kept_bytes
    forward_time = recorder.kept_time + recorder.other_time
    flops = counter.get_total_flops()
    # A recomputation stops at the last saved tensor: the work after it is skipped.
    tail_share = (forward_time - at_last_save[1]) / forward_time if forward_time > 0 else 0.0
    if measure:  # the recorder's per-op timing adds overhead: time the block again on its own
        share = recorder.other_time / forward_time if forward_time > 0 else 0.0
        with torch.no_grad():
            forward_time = _median_seconds(run, synchronize)
        selective_time = forward_time * share
        backward_time = 0.0
        if target.requires_grad:
            backward_time = max(
                0.0,
                _median_seconds(lambda: torch.autograd.backward(hidden_state(run()), gradient), synchronize)
                - forward_time,
            )
    else:
        selective_time = recorder.other_time
        backward_time = 2 * forward_time  # the usual estimate: two matmuls per forward matmul
    return output, {
        "input_bytes": _tensor_bytes(args[0]),
        "saved_bytes": sum(saved.values()),
        "input_saved": _storage_key(hidden) in saved,
        "selective_bytes": selective,
        "output_bytes": _tensor_bytes(target),
        "forward_extra_bytes": forward_extra,
        "backward_extra_bytes": backward_extra,
        "forward_time": forward_time,
        "selective_time": selective_time,
        "backward_time": backward_time,
        "forward_flops": flops,
        "tail_time": forward_time * tail_share,
        "tail_flops": flops - at_last_save[0],
        "selective_flops": 0,  # FLOPs are counted for matmul-like ops only, which selective keeps
    }


def profile(blocks, *sample_args, **sample_kwargs):
    """Measures a chain: runs `blocks` (an nn.Sequential or a list of modules) with grad, calling
    each as block(hidden, *sample_args[1:], **sample_kwargs), where hidden is sample_args[0] for
    the first block and the previous block's output (its first element if a tuple) after that:
    the nn.Sequential pattern and the Hugging Face decoder-layer pattern. Each block also runs a
    backward (gradient of ones) to measure its temporaries, with live bytes counted by
    LiveBytes. Saved bytes are deduplicated by storage, parameters excluded. On the meta device
    nothing runs: sizes come from shapes and time from FLOPs and bytes (META_* rates).

    Key/value caches in the arguments are switched off (without_caches): a cache would grow with
    each run of a block, and training does not use it. On CUDA each timed op and run is bracketed
    by device synchronisations.

    No side effects: the blocks' .grad, main_grad and hooks are untouched (gradients go to
    detached copies and are dropped), their buffers (BatchNorm statistics) are restored, and so
    are the global random number generators (CPU, and the CUDA devices used) that dropout draws
    from."""
    blocks = list(blocks)
    if not blocks or not sample_args:
        raise ValueError("profile: needs at least one block and a sample input")
    sample_args, sample_kwargs, _ = without_caches(sample_args, sample_kwargs)
    tensors = [t for t in tree_flatten((sample_args, sample_kwargs))[0] if isinstance(t, torch.Tensor)]
    measure = not any(t.device.type == "meta" for t in tensors)
    devices = cuda_devices([*tensors, *(t for block in blocks for t in [*block.parameters(), *block.buffers()])])
    synchronize = synchronizer(devices) if measure else None
    fields = {f.name: [] for f in dataclasses.fields(Chain) if f.name != "names"}
    hidden, extra = sample_args[0], sample_args[1:]
    with torch.random.fork_rng(devices=[device.index for device in devices], device_type="cuda"), torch.enable_grad():
        for block in blocks:
            state = [(b, b.clone()) for b in block.buffers()]
            try:
                output, measured = _profile_block(block, (hidden, *extra), sample_kwargs, measure, synchronize)
            finally:
                with torch.no_grad():
                    for buffer, value in state:
                        buffer.copy_(value)
            for name, value in measured.items():
                fields[name].append(value)
            hidden = hidden_state(output)
    return Chain(**fields, names=[type(b).__name__ for b in blocks])
