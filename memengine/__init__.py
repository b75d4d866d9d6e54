"""memengine: memory-efficient training for PyTorch.

Kernels: memengine.ops (fused in-place gradient accumulation into fp32 buffers).
Gradients: memengine.GradBuffer, memengine.nn.Linear, memengine.patch / unpatch,
memengine.MasterOptimizer; training steps: memengine.Engine; recomputation: memengine.checkpoint,
memengine.segment and memengine.plan.

The package is layered (each layer imports only the ones below it):
cli > studies > integrations > engine > distributed > plan > segments > nn > grad > autograd > ops > triton;
models (fixtures) stand apart. Data parallelism: memengine.Engine(..., process_group=...), memengine.distributed.
"""

from memengine import ops  # noqa: I001  (first: defines the op schemas and loads the kernels)
from memengine import distributed, grad, nn, plan, segments
from memengine.engine import Engine, causal_lm_loss
from memengine.grad import GradBuffer, MasterOptimizer
from memengine.nn import linear_cross_entropy, patch, unpatch
from memengine.segments import CheckpointError, checkpoint, segment

__version__ = "0.1.0"


def __getattr__(name):
    # memengine.integrations imports a framework (transformers) per submodule: only when asked for.
    if name == "integrations":
        import importlib

        return importlib.import_module("memengine.integrations")
    raise AttributeError(f"module 'memengine' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "Engine",
    "GradBuffer",
    "MasterOptimizer",
    "distributed",
    "grad",
    "nn",
    "ops",
    "plan",
    "segments",
    "checkpoint",
    "patch",
    "causal_lm_loss",
    "linear_cross_entropy",
    "segment",
    "unpatch",
    "__version__",
]
