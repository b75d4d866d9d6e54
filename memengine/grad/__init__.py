"""Gradients in one flat fp32 buffer: GradBuffer (layout, accumulation windows, hooks) and
MasterOptimizer (fp32 master weights for low-precision parameters)."""

from memengine.grad.buffer import ALIGNMENT, GradBuffer
from memengine.grad.hooks import buffer_of
from memengine.grad.master_optimizer import MasterOptimizer

__all__ = ["ALIGNMENT", "GradBuffer", "MasterOptimizer", "buffer_of"]
