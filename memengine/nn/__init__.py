"""Drop-in layers whose backward accumulates into fp32 gradient buffers, and memengine.patch,
which swaps them into a model in place."""

from memengine.nn.conv1d import Conv1DFusedMixin
from memengine.nn.linear import Linear
from memengine.nn.patching import is_fused, patch, unpatch

__all__ = ["Conv1DFusedMixin", "Linear", "is_fused", "patch", "unpatch"]
