"""Thin torch.autograd.Function classes over memengine's registered ops."""

from memengine.autograd.fused_linear import FusedLinearFunction

__all__ = ["FusedLinearFunction"]
