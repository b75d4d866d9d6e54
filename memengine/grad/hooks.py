"""Autograd hook bookkeeping of a GradBuffer: which buffer a parameter belongs to, the
post-accumulate-grad hook that folds every non-fused gradient into main_grad the moment autograd
produces it, and the forward pre-hook that refuses data-parallel wrappers the buffer cannot serve."""

import torch

from memengine import ops


def buffer_of(p):
    """The GradBuffer p belongs to, or None."""
    ref = getattr(p, "_memengine_buffer", None)
    return ref() if ref is not None else None


def is_view_of_main_grad(p):
    g = p.grad
    return g is not None and g.data_ptr() == p.main_grad.data_ptr() and g.shape == p.main_grad.shape


def parameter_name(p, module):
    """p's qualified name in `module` (for error messages), or a description of it."""
    if module is not None:
        for name, q in module.named_parameters(remove_duplicate=False):
            if q is p:
                return name
    return f"a parameter of shape {tuple(p.shape)}"


def fold_autograd_gradient(p):
    """Post-accumulate-grad hook: moves the gradient autograd just produced into main_grad."""
    buffer = buffer_of(p)
    if buffer is None or p.grad is None:
        return
    grad = p.grad
    if grad.layout != torch.strided:
        raise RuntimeError(
            f"memengine GradBuffer: {parameter_name(p, buffer.module)} received a sparse gradient "
            f"(layout {grad.layout}, e.g. from nn.Embedding(sparse=True) or F.embedding(sparse=True)); the fp32 "
            "buffer holds dense gradients only: use sparse=False"
        )
    if grad.requires_grad:
        raise_differentiable_gradient(p, buffer.module)
    if is_view_of_main_grad(p):
        # An fp32 parameter whose .grad is already the view: autograd added in place (claim() set
        # .grad to the view after an earlier contribution of this window), so nothing to move.
        buffer.claim(p)
        return
    overwrite = buffer.claim(p)  # replaces .grad by the view (fp32) or None: the temporary dies with `grad`
    ops.accumulate_(p.main_grad, grad, overwrite=overwrite)


def raise_differentiable_gradient(p, module):
    raise RuntimeError(
        f"memengine GradBuffer: backward(create_graph=True) would leave a differentiable gradient in "
        f"{parameter_name(p, module)}.grad, but the fp32 buffer holds gradient values only (no graph for a "
        "second backward). For gradient penalties take the inner gradient with torch.autograd.grad(..., "
        "inputs=..., create_graph=True), which leaves the buffer alone, and call .backward() without "
        "create_graph; or memengine.unpatch(model) for higher-order training"
    )


def data_parallel_wrapper(module):
    """The name of the data-parallel wrapper that `module` runs under or has become, or None:
    torch DDP (its forward is running), FullyShardedDataParallel or fully_shard (FSDPModule)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # DDP's forward sets this class attribute while it runs the wrapped module (torch >= 2.1).
    if isinstance(module, ddp) or getattr(ddp, "_active_ddp_module", None) is not None:
        return "torch.nn.parallel.DistributedDataParallel"
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        if isinstance(module, FullyShardedDataParallel):
            return "FullyShardedDataParallel"
        if isinstance(module, FSDPModule):
            return "torch.distributed.fsdp.fully_shard"
    return None


def refuse_data_parallel(module, where):
    wrapper = data_parallel_wrapper(module)
    if wrapper is not None:
        raise RuntimeError(
            f"memengine: the patched model {where} {wrapper}. memengine accumulates gradients into its own fp32 "
            f"GradBuffer, which {wrapper} neither reduces nor shards, so every rank would train on a wrong or "
            "unsynchronised gradient. Do not wrap a patched model in DDP/FSDP/fully_shard; memengine's own data "
            "parallelism over the buffer is not available yet, so train data-parallel with memengine.unpatch(model)"
        )


def check_module_forward(buffer_ref, module, args):
    """Forward pre-hook on the module a GradBuffer was built from: refuses data-parallel wrappers on every
    forward, and checks once per accumulation window that the buffer still covers the module's trainable
    parameters. A deep copy of the module carries this hook along; it does nothing there."""
    buffer = buffer_ref()
    if buffer is None or buffer.module is not module:
        return
    refuse_data_parallel(module, "runs inside")
    if torch.is_grad_enabled():
        buffer.check_coverage_once_per_window()
