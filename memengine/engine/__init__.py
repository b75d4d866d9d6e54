"""The training step: micro-batches, token-count normalisation, loss scaling, clipping."""

from memengine.engine.batches import split_batch
from memengine.engine.engine import Engine
from memengine.engine.losses import causal_lm_loss

__all__ = ["Engine", "causal_lm_loss", "split_batch"]
