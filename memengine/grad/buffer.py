"""GradBuffer: one flat fp32 gradient buffer for every trainable parameter of a model.

Each parameter `p` gets `p.main_grad`, a view of its slice. Gradients reach it two ways:
- fused layers (memengine.nn.Linear, patched Conv1D) add dW and db straight into main_grad
  from their backward (wgrad_accumulate_ / bias_grad_accumulate_): no weight-gradient tensor
  ever exists;
- every other parameter's gradient is folded in by a post-accumulate-grad hook the moment
  autograd produces it (accumulate_), and the temporary is dropped right there.

Accumulation windows: after `start_window()` (or `zero_()`), a parameter's first contribution
overwrites its slice (beta = 0) instead of needing a zeroing pass; later ones add. The state
belongs to the buffer, per parameter, and changes only in backward, so a recomputed forward
does not disturb it. `finish_window()` zeroes the slices of parameters that received nothing.

From its first contribution in a window on, `p.grad` is the main_grad view itself, for every
parameter: torch.nn.utils.clip_grad_norm_ and anything else that reads .grad sees the buffer's fp32
gradient, and a backward that raises half way (an out-of-memory error the training loop catches)
leaves .grad as plain PyTorch would: what was accumulated so far. Clearing .grad (model.zero_grad(),
optimizer.zero_grad(), Trainer's and accelerate's zero-grad calls) opens a new window for that
parameter. bf16/fp16 parameters get an fp32 .grad through torch's `grad_dtype = torch.float32`
(restored by release()): autograd casts each low-precision contribution to fp32 before it sums them,
so a parameter used several times in one backward (an embedding shared by encoder and decoder,
a LayerNorm shared across layers) is summed in fp32 as plain PyTorch with grad_dtype=float32 sums
it, not in bf16 before the fold (the temporary of such a gradient is fp32: 4 bytes per element of
the parameter, until the fold hook drops it). Step them through
memengine.MasterOptimizer, which owns fp32 master weights whose .grad are the views: any other
torch optimizer about to step them raises (refuse_low_precision_step, a global step pre-hook), as it
would apply the fp32 gradient straight to the low-precision weights. fp32 parameters work with any
torch.optim optimizer unchanged.

Built from a module, the buffer also guards it: sparse embeddings and data-parallel wrappers (DDP,
FSDP, fully_shard), whose reduction would bypass the buffer, are refused, and check_coverage()
(run by a forward pre-hook once per window) refuses trainable parameters the buffer does not cover.
"""

import functools
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from memengine import ops
from memengine.grad.hooks import (
    check_module_forward,
    fold_autograd_gradient,
    is_view_of_main_grad,
    parameter_name,
    refuse_data_parallel,
    refuse_low_precision_step,
    track_low_precision_buffer,
)

ALIGNMENT = 64  # elements: each slice starts on a 256-byte boundary for fp32


class Bucket:
    """A contiguous range [start, end) of GradBuffer.data holding whole parameters (in buffer order),
    reduced as one collective by data parallelism. end - start is a multiple of the buffer's
    bucket_multiple (padding after the last parameter, zero and never written)."""

    def __init__(self, index, start, end, params):
        self.index, self.start, self.end, self.params = index, start, end, params

    @property
    def numel(self):
        return self.end - self.start

    def shard(self, rank, world):
        """[start, end) of shard `rank` of `world` equal contiguous shards of the bucket, in buffer coordinates."""
        size = self.numel // world
        return self.start + rank * size, self.start + (rank + 1) * size

    def __repr__(self):
        return f"Bucket({self.index}, [{self.start}, {self.end}), {len(self.params)} parameters)"


def layout(params, bucket_numel=None, bucket_multiple=1):
    """(offsets, total, buckets) of a buffer holding `params` in this order: each parameter starts on an
    ALIGNMENT-element boundary. With bucket_numel, parameters are grouped into consecutive buckets of
    about that many elements (a bucket closes once it holds bucket_numel or more; a parameter is never
    split), each padded to a multiple of ALIGNMENT * bucket_multiple elements so that it splits evenly
    into bucket_multiple aligned shards. Without, one bucket holds everything, unpadded."""
    offsets, buckets, total, start, members = [], [], 0, 0, []
    pad = ALIGNMENT * bucket_multiple
    for p in params:
        total = -(-total // ALIGNMENT) * ALIGNMENT
        offsets.append(total)
        total += p.numel()
        members.append(p)
        if bucket_numel is not None and total - start >= bucket_numel:
            end = start + -(-(total - start) // pad) * pad
            buckets.append(Bucket(len(buckets), start, end, members))
            start = total = end
            members = []
    if members or not buckets:
        end = total if bucket_numel is None else start + -(-(total - start) // pad) * pad
        buckets.append(Bucket(len(buckets), start, end, members))
        total = end
    return offsets, total, buckets


register_optimizer_step_pre_hook(refuse_low_precision_step)  # once: a module is imported once per process


class GradBuffer:
    def __init__(self, module_or_params, dtype=torch.float32, bucket_bytes=None, bucket_multiple=1):
        """bucket_bytes: group the parameters into buckets of about this many bytes of gradient, for
        data parallelism (memengine.distributed); bucket_multiple: pad each bucket so that it splits
        into this many equal shards (the data-parallel world size). Default: one unpadded bucket."""
        if bucket_bytes is not None and bucket_bytes < 1:
            raise ValueError(f"GradBuffer: bucket_bytes must be positive, got {bucket_bytes}")
        if bucket_multiple < 1:
            raise ValueError(f"GradBuffer: bucket_multiple must be at least 1, got {bucket_multiple}")
        if dtype != torch.float32:
            raise ValueError(f"GradBuffer: dtype must be torch.float32 (the kernels accumulate into fp32), got {dtype}")
        module = module_or_params if isinstance(module_or_params, torch.nn.Module) else None
        if module is not None:
            _refuse_unsupported_modules(module)
            candidates = module.parameters()  # shared (tied) parameters are listed once
        else:
            candidates = module_or_params
        params, seen = [], set()
        for p in candidates:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"GradBuffer: expected a module or parameters, got an element of type {type(p)}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("GradBuffer: no trainable parameters (none has requires_grad=True)")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"GradBuffer: all parameters must be on one device, found {sorted(map(str, devices))}")
        for p in params:
            if getattr(p, "main_grad", None) is not None:
                raise ValueError(
                    "GradBuffer: a parameter already has main_grad (it belongs to another GradBuffer); "
                    "call .release() on that buffer first"
                )
        # Reverse registration order: the order in which backward produces the gradients.
        self.params = params[::-1]
        self.bucket_bytes, self.bucket_multiple = bucket_bytes, bucket_multiple
        bucket_numel = None if bucket_bytes is None else max(1, bucket_bytes // dtype.itemsize)
        self.offsets, total, self.buckets = layout(self.params, bucket_numel, bucket_multiple)
        self.data = torch.zeros(total, dtype=dtype, device=devices.pop())
        self._module = weakref.ref(module) if module is not None else None
        self._covered = {id(p) for p in self.params}
        self._built_as = {id(p): (p.dtype, p.device) for p in self.params}  # check_parameters() compares
        self._coverage_checked = False  # check_coverage() passed in this window
        self._first = {}  # id(p) -> True while p's next contribution must overwrite
        self._grad_is_view = set()  # ids of parameters whose .grad we set to the main_grad view
        self._low_precision_grad_dtypes = {}  # id(p) -> p.grad_dtype before the buffer, for release()
        # graph task id -> parameters that received a contribution in that backward. Keyed by task,
        # not one flag: a backward that raises never runs its end-of-backward callback, and nested
        # backward passes (reentrant checkpoints) each queue their own.
        self._touched = {}
        self._ready_hooks = []
        self._contribution_hooks = []
        self._hook_handles = []
        self_ref = weakref.ref(self)
        if module is not None:
            # A partial over a weak reference (not a bound method): a deep copy of the module carries
            # the hook along without copying the buffer, and the hook does nothing on the copy.
            self._hook_handles.append(
                module.register_forward_pre_hook(functools.partial(check_module_forward, self_ref))
            )
        for p, offset in zip(self.params, self.offsets, strict=True):
            # A .grad from before the buffer existed is not part of any window. (Autograd also
            # runs post-accumulate hooks for parameters that a fused layer returned no
            # gradient for, so a leftover .grad would be folded in again.)
            p.grad = None
            if p.dtype != torch.float32:
                self._low_precision_grad_dtypes[id(p)] = p.grad_dtype
                # fp32: .grad may be the fp32 view, and autograd sums a multi-use parameter's contributions in
                # fp32 (with None it summed them in bf16: 1.7e-3 relative error on a shared embedding, issue 18)
                p.grad_dtype = torch.float32
            p.main_grad = self.data[offset : offset + p.numel()].view_as(p)
            p._memengine_buffer = self_ref
            self._first[id(p)] = True
            self._hook_handles.append(p.register_post_accumulate_grad_hook(fold_autograd_gradient))
        if self._low_precision_grad_dtypes:
            track_low_precision_buffer(self, live=True)

    @property
    def module(self):
        """The module the buffer was built from (None if built from parameters, or if it is gone)."""
        return self._module() if self._module is not None else None

    # -- windows -------------------------------------------------------------------------
    def start_window(self):
        """Opens a new accumulation window without touching memory: each parameter's next
        contribution overwrites its slice."""
        for p in self.params:
            self._first[id(p)] = True
            if is_view_of_main_grad(p):
                p.grad = None  # autograd must not add into the stale view
        self._grad_is_view.clear()
        self._coverage_checked = False
        if torch._C._current_graph_task_id() == -1:
            self._touched.clear()  # left by backward passes that raised before their end-of-backward callback

    def zero_(self):
        """Zeroes the buffer and opens a new window."""
        self.data.zero_()
        self.start_window()

    def _open_window_if_grad_cleared(self, p):
        """A main_grad view in .grad that was cleared since claim() set it (model.zero_grad(),
        optimizer.zero_grad(), Trainer's or accelerate's zero-grad calls) opens a new window for p."""
        if id(p) in self._grad_is_view and not is_view_of_main_grad(p):
            self._first[id(p)] = True
            self._grad_is_view.discard(id(p))
            self._coverage_checked = False  # and a new optimizer step: check coverage again

    def finish_window(self, params=None):
        """Zeroes the slices of parameters (of `params`, default all) that received no gradient in the
        current window, so that the buffer holds this window's gradients. Returns those parameters."""
        empty = [p for p in (self.params if params is None else params) if not self.received_gradient(p)]
        for p in empty:
            p.main_grad.zero_()
        return empty

    def received_gradient(self, p):
        """True if p has had a contribution in the current window."""
        self._open_window_if_grad_cleared(p)
        return not self._first[id(p)]

    def mark_received(self, p):
        """Records that p's slice holds a gradient of this window although no contribution landed here
        (data parallelism: another rank's, brought in by the reduction); .grad becomes the view."""
        self._first[id(p)] = False
        p.grad = p.main_grad
        self._grad_is_view.add(id(p))

    # -- statistics and clipping on the whole buffer ------------------------------------------
    def stats(self, scale=1.0):
        """data *= scale; returns [L2 norm, non-finite count] on the device (grad_stats_)."""
        return ops.grad_stats_(self.data, scale)

    def clip_(self, stats, max_norm):
        ops.clip_(self.data, stats, max_norm)

    # -- coverage ---------------------------------------------------------------------------
    def check_coverage(self):
        """Raises RuntimeError naming the parameter if the module the buffer was built from has a
        trainable parameter the buffer does not cover (unfrozen, added or replaced after the buffer
        was built, e.g. by FSDP or fully_shard), whose gradient would never reach main_grad, or if a
        covered parameter is no longer part of the module. Nothing to check for a buffer built from
        a list of parameters. Also check_parameters(). Costs one walk over the module's parameters."""
        self.check_parameters()
        module = self.module
        if module is None:
            return
        present = set()
        for name, p in module.named_parameters():
            present.add(id(p))
            if p.requires_grad and id(p) not in self._covered:
                replaced_by = type(p).__name__ if type(p).__name__ in ("DTensor", "FlatParameter") else None
                cause = (
                    f"replaced by a {replaced_by} (FSDP / fully_shard)" if replaced_by else "frozen, added or replaced"
                )
                raise RuntimeError(
                    f"memengine GradBuffer: parameter '{name}' requires grad but is not in the GradBuffer (it was "
                    f"{cause} after memengine.patch / GradBuffer ran), so its gradient would never reach main_grad "
                    "and it would not be trained. Set requires_grad and build the model completely before "
                    "memengine.patch(model) / memengine.Engine(model), or call memengine.unpatch(model) and patch "
                    "again (then rebuild the Engine or optimizer)"
                )
        for p in self.params:
            if id(p) not in present:
                raise RuntimeError(
                    f"memengine GradBuffer: a parameter of shape {tuple(p.shape)} in the GradBuffer is no longer "
                    "part of the model (a module was replaced, or a wrapper such as FSDP / fully_shard replaced its "
                    "parameters), so the buffer is stale. Call memengine.unpatch(model) and patch again after "
                    "changing the model"
                )

    def check_parameters(self):
        """Raises RuntimeError naming the parameter if a covered parameter changed dtype or device since the
        buffer was built (model.to(torch.bfloat16), .half(), .cuda() after memengine.patch), or its main_grad is
        no longer its fp32 slice of the buffer (Module.to casts .grad in place, and .grad is that slice): its
        gradient slice, and the masters and optimizer state built over it, were made for the old dtype and
        device, so training on would be wrong or fail inside a kernel. Costs one walk over the parameters."""
        base, itemsize = self.data.data_ptr(), self.data.element_size()
        for p, offset in zip(self.params, self.offsets, strict=True):
            dtype, device = self._built_as[id(p)]
            main_grad = getattr(p, "main_grad", None)
            intact = (
                main_grad is not None
                and main_grad.dtype == self.data.dtype
                and main_grad.data_ptr() == base + offset * itemsize
            )
            if p.dtype == dtype and p.device == device and intact:
                continue
            if (p.dtype, p.device) != (dtype, device):
                change = f"changed from {dtype} on {device} to {p.dtype} on {p.device}"
            else:
                change = "had its main_grad replaced or cast"
            raise RuntimeError(
                f"memengine GradBuffer: {parameter_name(p, self.module)} {change} after memengine.patch / "
                "GradBuffer built its fp32 gradient slice (and any MasterOptimizer or Engine its fp32 masters and "
                "optimizer state). Cast or move the model before memengine.patch / memengine.Engine / "
                "prepare(trainer); or call memengine.unpatch(model), cast or move it, patch again and build a new "
                "Engine or MasterOptimizer"
            )

    def check_coverage_once_per_window(self):
        """check_coverage() at most once per accumulation window (the forward pre-hook calls this)."""
        if not self._coverage_checked:
            self.check_coverage()
            self._coverage_checked = True

    # -- hooks -----------------------------------------------------------------------------
    def register_ready_hook(self, fn):
        """fn(param) runs once per parameter per backward that gave it a gradient, after that
        gradient is complete in main_grad (at the end of the backward pass; a backward that
        raises fires none). Returns a handle with .remove()."""
        self._ready_hooks.append(fn)
        return _HookHandle(self._ready_hooks, fn)

    def register_contribution_hook(self, fn):
        """fn(param) runs during backward each time a contribution to param's gradient has landed in
        main_grad (a fused layer's weight or bias gradient, or a gradient autograd produced and the
        post-accumulate hook folded in), and each time that hook runs for param after a fused
        contribution (autograd runs it for the parameter the fused layer returned no gradient for).
        The number of calls per backward is thus fixed by the graph, and the last one comes after the
        last contribution: the readiness signal of data parallelism. Returns a handle with .remove()."""
        self._contribution_hooks.append(fn)
        return _HookHandle(self._contribution_hooks, fn)

    def contributed(self, p):
        """Called right after a contribution to p landed in main_grad; runs the contribution hooks."""
        for fn in self._contribution_hooks:
            fn(p)

    def release(self):
        """Detaches the buffer: removes hooks and the main_grad attributes; low-precision parameters
        lose their fp32 .grad and get their grad_dtype back (fp32 ones keep the view as a plain .grad)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for p in self.params:
            if id(p) in self._low_precision_grad_dtypes:
                if p.grad is not None and p.grad.dtype != p.dtype:
                    p.grad = None  # the buffer's fp32 view: no plain low-precision loop could use it
                p.grad_dtype = self._low_precision_grad_dtypes[id(p)]
            for name in ("main_grad", "_memengine_buffer"):
                if hasattr(p, name):
                    delattr(p, name)
        self._low_precision_grad_dtypes = {}
        track_low_precision_buffer(self, live=False)

    # -- contributions (called from backward) -------------------------------------------------
    def claim(self, p):
        """Whether p's contribution now must overwrite; records that p got one in this backward."""
        if p.main_grad.dtype != self.data.dtype or p.dtype != self._built_as[id(p)][0]:
            self.check_parameters()  # cast after patch (the forward's check runs once per window): say so
        self._open_window_if_grad_cleared(p)
        first = self._first[id(p)]
        self._first[id(p)] = False
        # Now, not at the end of backward: zero_grad() must be able to clear what a backward that raises
        # half way has accumulated. Any low-precision temporary autograd left in .grad dies here.
        p.grad = p.main_grad
        self._grad_is_view.add(id(p))
        task = torch._C._current_graph_task_id()
        touched = self._touched.get(task)
        if touched is None:
            touched = self._touched[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(self._end_of_backward, task))
        touched.append(p)
        return first

    def _end_of_backward(self, task):
        """Fires the ready hooks of a backward pass that completed (one that raised never gets here)."""
        done = set()
        for p in self._touched.pop(task, []):
            if id(p) in done:
                continue
            done.add(id(p))
            for fn in list(self._ready_hooks):
                fn(p)

    def add_weight_gradient(self, weight, grad_output, input):
        """main_grad(weight [out, in]) (+)= grad_output^T @ input, as a fused layer's backward."""
        ops.wgrad_accumulate_(weight.main_grad, grad_output, input, overwrite=self.claim(weight))
        self.contributed(weight)

    def add_bias_gradient(self, bias, grad_output):
        ops.bias_grad_accumulate_(bias.main_grad, grad_output, overwrite=self.claim(bias))
        self.contributed(bias)


def _refuse_unsupported_modules(module):
    """Sparse embeddings and data-parallel wrappers: a GradBuffer cannot serve them (see the module docstring)."""
    for name, submodule in module.named_modules():
        refuse_data_parallel(submodule, "is or contains")
        weight = getattr(submodule, "weight", None)
        if getattr(submodule, "sparse", False) is True and isinstance(weight, torch.Tensor) and weight.requires_grad:
            raise ValueError(
                f"GradBuffer: {name or 'the model'} is {type(submodule).__name__}(sparse=True), whose sparse weight "
                "gradients the fp32 buffer cannot hold; construct it with sparse=False"
            )


class _HookHandle:
    def __init__(self, hooks, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self):
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)
