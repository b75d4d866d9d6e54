"""memengine: memory-efficient training for PyTorch.

Kernels: memengine.ops (fused in-place gradient accumulation into fp32 buffers).
"""

from memengine import (
    _extension,
    _ops,  # noqa: F401  (defines the op schemas before the kernels register)
)

_extension._load()

from memengine import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
