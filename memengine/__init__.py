"""memengine: memory-efficient training for PyTorch.

Kernels: memengine.ops (fused in-place gradient accumulation into fp32 buffers).
Gradients: memengine.GradBuffer, memengine.nn.Linear, memengine.patch / unpatch,
memengine.MasterOptimizer; training steps: memengine.Engine.
"""

from memengine import (
    _extension,
    _ops,  # noqa: F401  (defines the op schemas before the kernels register)
)

_extension._load()

from memengine import nn, ops, plan  # noqa: E402
from memengine.checkpoint import CheckpointError, checkpoint  # noqa: E402
from memengine.engine import Engine  # noqa: E402
from memengine.grad_buffer import GradBuffer  # noqa: E402
from memengine.optim import MasterOptimizer  # noqa: E402
from memengine.patching import patch, unpatch  # noqa: E402
from memengine.segment import segment  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "Engine",
    "GradBuffer",
    "MasterOptimizer",
    "nn",
    "ops",
    "plan",
    "checkpoint",
    "patch",
    "segment",
    "unpatch",
    "__version__",
]
