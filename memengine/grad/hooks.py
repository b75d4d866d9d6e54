"""Autograd hook bookkeeping of a GradBuffer: which buffer a parameter belongs to, the
post-accumulate-grad hook that folds every non-fused gradient into main_grad the moment autograd
produces it, the forward pre-hook that refuses data-parallel wrappers the buffer cannot serve, and
the global optimizer step pre-hook that refuses a plain torch optimizer stepping low-precision
parameters whose gradients live in a buffer."""

import weakref

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
        buffer.contributed(p)
        return
    overwrite = buffer.claim(p)  # replaces .grad by the view (fp32) or None: the temporary dies with `grad`
    ops.accumulate_(p.main_grad, grad, overwrite=overwrite)
    del grad
    buffer.contributed(p)


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
            "unsynchronised gradient. Do not wrap a patched model in DDP/FSDP/fully_shard; use memengine's own data "
            "parallelism, which reduces the buffer across ranks (and shards masters and optimizer state, ZeRO-1): "
            "memengine.Engine(model, optimizer, micro_batch_size, process_group=torch.distributed.group.WORLD) "
            "(docs/data-parallel.md); or call memengine.unpatch(model) before wrapping it"
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


# -- optimizer steps ---------------------------------------------------------------------------------
# Live GradBuffers holding bf16/fp16 parameters, and a counter that changes whenever such a buffer is
# built or released: what an optimizer holds (below) is looked up again only when the counter or its
# param groups change, so the hook does not walk the parameters of an optimizer at every step.
_low_precision_buffers = weakref.WeakSet()
_low_precision_generation = 0
_held_by_optimizer = weakref.WeakKeyDictionary()  # optimizer -> _HeldParameters


def track_low_precision_buffer(buffer, live):
    """Called by a GradBuffer with bf16/fp16 parameters when it is built (live=True) or released."""
    global _low_precision_generation
    if live:
        _low_precision_buffers.add(buffer)
    else:
        _low_precision_buffers.discard(buffer)
    _low_precision_generation += 1


class _HeldParameters:
    """The low-precision parameters of live GradBuffers that an optimizer holds, and what that was
    computed from (the counter and each param group's parameter list, by identity and length)."""

    def __init__(self, param_groups):
        self.generation = _low_precision_generation
        self.groups = [(group["params"], len(group["params"])) for group in param_groups]
        self.params = [
            p
            for group in param_groups
            for p in group["params"]
            if p.dtype != torch.float32 and buffer_of(p) in _low_precision_buffers
        ]

    def is_current(self, param_groups):
        return (
            self.generation == _low_precision_generation
            and len(self.groups) == len(param_groups)
            and all(
                group["params"] is params and len(params) == length
                for group, (params, length) in zip(param_groups, self.groups, strict=True)
            )
        )


def refuse_low_precision_step(optimizer, args, kwargs):
    """Global optimizer step pre-hook (registered once by memengine.grad.buffer). Raises RuntimeError if
    `optimizer` is about to step bf16/fp16 parameters of a GradBuffer that hold a gradient: their .grad is
    the fp32 main_grad view, which a torch optimizer would apply straight to the low-precision weights
    (lossy: small updates round away) or fail on. memengine.MasterOptimizer holds fp32 masters instead of
    those parameters, so it never trips this. Costs a length check when no such buffer is alive, and a
    comparison per param group otherwise (the parameters are walked only when the groups change)."""
    if not _low_precision_buffers:
        return
    param_groups = optimizer.param_groups
    try:
        held, cacheable = _held_by_optimizer.get(optimizer), True
    except TypeError:  # an unhashable optimizer class: its parameters are looked at every step
        held, cacheable = None, False
    if held is None or not held.is_current(param_groups):
        held = _HeldParameters(param_groups)
        if cacheable:
            _held_by_optimizer[optimizer] = held
    stepped = [p for p in held.params if p.grad is not None]
    if not stepped:
        return
    buffer = buffer_of(stepped[0])
    first = parameter_name(stepped[0], buffer.module if buffer is not None else None)
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in stepped}))
    name = type(optimizer).__name__
    cls = f"torch.optim.{name}" if type(optimizer).__module__.startswith("torch.optim") else name
    raise RuntimeError(
        f"memengine: {name}.step() would update {len(stepped)} {dtypes} parameter(s) of a patched model "
        f"(first: {first}) directly from their fp32 GradBuffer "
        "gradients; a torch optimizer over low-precision weights loses small updates to rounding "
        "(or fails on the dtype mismatch). Step them through fp32 master weights: "
        f"memengine.MasterOptimizer({cls}, memengine.patch(model), lr=...) (for Hugging Face "
        "Trainer pass it in optimizers=(optimizer, scheduler)), or train with memengine.Engine; or keep the "
        "model in fp32 (model.float() before memengine.patch), or memengine.unpatch(model) for plain "
        "low-precision training"
    )
