"""Keeping module state (BatchNorm running statistics) from being updated twice when a forward is
recomputed: NoStateUpdates sends in-place writes to pre-existing tensors to copies, and
state_tensors names the tensors whose version counters tell whether a forward wrote any state."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class NoStateUpdates(TorchDispatchMode):
    """During recomputation, in-place writes to tensors that existed before it started go to
    copies: module state (BatchNorm statistics) is updated by the forward only."""

    def __init__(self):
        super().__init__()
        self.created = set()  # storage addresses of tensors made during the recomputation

    # These update running_mean/running_var (arguments 3 and 4) in place without saying so in
    # their schemas.
    _UNANNOTATED_BATCH_NORMS = ("aten::native_batch_norm", "aten::cudnn_batch_norm", "aten::miopen_batch_norm")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.name in self._UNANNOTATED_BATCH_NORMS:
            args = [a.clone() if i in (3, 4) and self._foreign(a) else a for i, a in enumerate(args)]
        elif schema.is_mutable:
            args, kwargs = list(args), dict(kwargs)
            for position, argument in enumerate(schema.arguments):
                if argument.alias_info is None or not argument.alias_info.is_write:
                    continue
                if argument.kwarg_only or position >= len(args):
                    value = kwargs.get(argument.name)
                    if self._foreign(value):
                        kwargs[argument.name] = value.clone()
                elif self._foreign(args[position]):
                    args[position] = args[position].clone()
        out = func(*args, **kwargs)
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for result, tensor in zip(schema.returns, outputs, strict=False):
            # New memory only: a view or an in-place result aliases something that already existed.
            if isinstance(tensor, torch.Tensor) and result.alias_info is None:
                self.created.add(tensor.untyped_storage().data_ptr())
        return out

    def _foreign(self, value):
        return isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in self.created


def state_tensors(fn, leaves):
    """The tensors fn could update in place that can be checked cheaply: its tensor arguments and
    the parameters and buffers of the modules it is, is a method of, or receives (`leaves`: its
    flattened arguments). None when fn is none of those (a closure, say): then any pre-existing
    tensor may be written."""
    owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    modules = [m for m in [owner, *leaves] if isinstance(m, torch.nn.Module)]
    if not modules:
        return None
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    for module in modules:
        tensors.extend(module.parameters())
        tensors.extend(module.buffers())
    return tensors
