"""Drop-in layers whose backward accumulates into fp32 gradient buffers, and memengine.patch,
which swaps them into a model in place."""

from memengine.nn.conv1d import Conv1DFusedMixin
from memengine.nn.embedding import Embedding
from memengine.nn.linear import Linear
from memengine.nn.linear_cross_entropy import linear_cross_entropy
from memengine.nn.patching import is_fused, patch, unpatch

__all__ = ["Conv1DFusedMixin", "Embedding", "Linear", "is_fused", "linear_cross_entropy", "patch", "unpatch"]
