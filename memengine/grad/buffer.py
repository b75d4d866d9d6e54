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

fp32 parameters: after backward `p.grad` is the main_grad view itself, so any torch.optim
optimizer works unchanged. bf16/fp16 parameters: `p.grad` stays None; step them through
memengine.MasterOptimizer, which owns fp32 master weights whose .grad are the views.
"""

import weakref

import torch

from memengine import ops
from memengine.grad.hooks import fold_autograd_gradient, is_view_of_main_grad

ALIGNMENT = 64  # elements: each slice starts on a 256-byte boundary for fp32


class GradBuffer:
    def __init__(self, module_or_params, dtype=torch.float32):
        if dtype != torch.float32:
            raise ValueError(f"GradBuffer: dtype must be torch.float32 (the kernels accumulate into fp32), got {dtype}")
        if isinstance(module_or_params, torch.nn.Module):
            candidates = module_or_params.parameters()  # shared (tied) parameters are listed once
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
        self.offsets = []
        total = 0
        for p in self.params:
            total = -(-total // ALIGNMENT) * ALIGNMENT
            self.offsets.append(total)
            total += p.numel()
        self.data = torch.zeros(total, dtype=dtype, device=devices.pop())
        self._first = {}  # id(p) -> True while p's next contribution must overwrite
        self._grad_is_view = set()  # ids of fp32 parameters whose .grad we set to the main_grad view
        self._touched = []  # parameters that received a contribution in the running backward
        self._callback_queued = False
        self._ready_hooks = []
        self._hook_handles = []
        self_ref = weakref.ref(self)
        for p, offset in zip(self.params, self.offsets, strict=True):
            # A .grad from before the buffer existed is not part of any window. (Autograd also
            # runs post-accumulate hooks for parameters that a fused layer returned no
            # gradient for, so a leftover .grad would be folded in again.)
            p.grad = None
            p.main_grad = self.data[offset : offset + p.numel()].view_as(p)
            p._memengine_buffer = self_ref
            self._first[id(p)] = True
            self._hook_handles.append(p.register_post_accumulate_grad_hook(fold_autograd_gradient))

    # -- windows -------------------------------------------------------------------------
    def start_window(self):
        """Opens a new accumulation window without touching memory: each parameter's next
        contribution overwrites its slice."""
        for p in self.params:
            self._first[id(p)] = True
            if is_view_of_main_grad(p):
                p.grad = None  # autograd must not add into the stale view
        self._grad_is_view.clear()

    def zero_(self):
        """Zeroes the buffer and opens a new window."""
        self.data.zero_()
        self.start_window()

    def finish_window(self):
        """Zeroes the slices of parameters that received no gradient since start_window(), so that
        the whole buffer holds this window's gradients. Returns those parameters."""
        empty = [p for p in self.params if self._first[id(p)]]
        for p in empty:
            p.main_grad.zero_()
        return empty

    def received_gradient(self, p):
        """True if p has had a contribution in the current window."""
        return not self._first[id(p)]

    # -- statistics and clipping on the whole buffer ------------------------------------------
    def stats(self, scale=1.0):
        """data *= scale; returns [L2 norm, non-finite count] on the device (grad_stats_)."""
        return ops.grad_stats_(self.data, scale)

    def clip_(self, stats, max_norm):
        ops.clip_(self.data, stats, max_norm)

    # -- hooks -----------------------------------------------------------------------------
    def register_ready_hook(self, fn):
        """fn(param) runs once per parameter per backward that gave it a gradient, after that
        gradient is complete in main_grad (at the end of the backward pass). Returns a handle
        with .remove()."""
        self._ready_hooks.append(fn)
        return _HookHandle(self._ready_hooks, fn)

    def release(self):
        """Detaches the buffer: removes hooks and the main_grad attributes."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for p in self.params:
            for name in ("main_grad", "_memengine_buffer"):
                if hasattr(p, name):
                    delattr(p, name)

    # -- contributions (called from backward) -------------------------------------------------
    def claim(self, p):
        """Whether p's contribution now must overwrite; records that p got one in this backward."""
        first = self._first[id(p)]
        if id(p) in self._grad_is_view and not is_view_of_main_grad(p):
            # The user cleared .grad (optimizer.zero_grad()): that opens a new window for p.
            first = True
            self._grad_is_view.discard(id(p))
        self._first[id(p)] = False
        self._touched.append(p)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        return first

    def _end_of_backward(self):
        touched, self._touched, self._callback_queued = self._touched, [], False
        done = set()
        for p in touched:
            if id(p) in done:
                continue
            done.add(id(p))
            if p.dtype == torch.float32:
                p.grad = p.main_grad  # any torch.optim optimizer reads it there
                self._grad_is_view.add(id(p))
            for fn in list(self._ready_hooks):
                fn(p)

    def add_weight_gradient(self, weight, grad_output, input):
        """main_grad(weight [out, in]) (+)= grad_output^T @ input, as a fused layer's backward."""
        ops.wgrad_accumulate_(weight.main_grad, grad_output, input, overwrite=self.claim(weight))

    def add_bias_gradient(self, bias, grad_output):
        ops.bias_grad_accumulate_(bias.main_grad, grad_output, overwrite=self.claim(bias))


class _HookHandle:
    def __init__(self, hooks, fn):
        self._hooks, self._fn = hooks, fn

    def remove(self):
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)
