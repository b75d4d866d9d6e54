"""memengine inside the training loops people already run.

memengine.integrations.transformers.prepare(trainer): a Hugging Face Trainer trains with fused
fp32 gradient accumulation and fp32 master weights (and, optionally, a memory budget).

A plain accelerate loop needs no module of its own: patch the model and step it through
memengine.MasterOptimizer before accelerator.prepare (docs/integrations.md shows the loop).

Nothing here is imported by `import memengine`: each submodule imports its framework when first
used (memengine.integrations.transformers imports transformers).
"""

import importlib

SUBMODULES = ("transformers",)


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f"memengine.integrations.{name}")
    raise AttributeError(f"module 'memengine.integrations' has no attribute {name!r}")
