"""memengine's kernels: one public function per op (in place, returning None, except grad_stats_).

Importing this package defines the op schemas (namespace "memengine") with their reference and
fake kernels, then loads the compiled extension memengine._C, whose C++/CUDA kernels register
on top. Which kernel runs is decided in memengine.ops.backend (MEMENGINE_BACKEND).
"""

from memengine.ops import (
    extension,
    schemas,  # noqa: F401  (defines the schemas before the kernels register)
)

extension.load()

from memengine.ops.functions import (  # noqa: E402
    OPS,
    accumulate_,
    bias_grad_accumulate_,
    clip_,
    combine_grad_stats,
    cross_entropy_tile_backward_,
    cross_entropy_tile_forward_,
    grad_stats_,
    grad_stats_in_pieces,
    multi_accumulate_,
    wgrad_accumulate_,
)

__all__ = [
    "OPS",
    "accumulate_",
    "bias_grad_accumulate_",
    "clip_",
    "combine_grad_stats",
    "cross_entropy_tile_backward_",
    "cross_entropy_tile_forward_",
    "grad_stats_",
    "grad_stats_in_pieces",
    "multi_accumulate_",
    "wgrad_accumulate_",
]
