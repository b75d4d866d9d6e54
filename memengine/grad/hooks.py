"""Autograd hook bookkeeping of a GradBuffer: which buffer a parameter belongs to, and the
post-accumulate-grad hook that folds every non-fused gradient into main_grad the moment autograd
produces it."""

from memengine import ops


def buffer_of(p):
    """The GradBuffer p belongs to, or None."""
    ref = getattr(p, "_memengine_buffer", None)
    return ref() if ref is not None else None


def is_view_of_main_grad(p):
    g = p.grad
    return g is not None and g.data_ptr() == p.main_grad.data_ptr() and g.shape == p.main_grad.shape


def fold_autograd_gradient(p):
    """Post-accumulate-grad hook: moves the gradient autograd just produced into main_grad."""
    buffer = buffer_of(p)
    if buffer is None or p.grad is None:
        return
    if is_view_of_main_grad(p):
        # An fp32 parameter whose .grad is already the view: autograd added in place. That only
        # happens after a first contribution (start_window() resets .grad), so nothing to do.
        buffer.claim(p)
        return
    overwrite = buffer.claim(p)
    grad, p.grad = p.grad, None  # the temporary dies with this frame
    ops.accumulate_(p.main_grad, grad, overwrite=overwrite)
