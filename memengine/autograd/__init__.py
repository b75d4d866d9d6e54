"""Thin torch.autograd.Function classes over memengine's registered ops."""

from memengine.autograd.fused_linear import FusedLinearFunction
from memengine.autograd.linear_cross_entropy import LinearCrossEntropyFunction

__all__ = ["FusedLinearFunction", "LinearCrossEntropyFunction"]
