"""Recompute-aware segment execution: checkpointing (checkpoint, state protection), measuring
(live bytes, profile), planning (model/simulate, solve) and applying a plan (apply)."""

from memengine.segments.apply import SegmentHandle, repeated_blocks, segment
from memengine.segments.budget import activation_share, normalize_budget, parse_bytes
from memengine.segments.checkpoint import CheckpointError, checkpoint

__all__ = [
    "CheckpointError",
    "SegmentHandle",
    "activation_share",
    "checkpoint",
    "normalize_budget",
    "parse_bytes",
    "repeated_blocks",
    "segment",
]
