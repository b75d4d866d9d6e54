"""The training step: micro-batches, token-count normalisation, loss scaling, clipping."""

from memengine.engine.batches import split_batch
from memengine.engine.engine import Engine

__all__ = ["Engine", "split_batch"]
