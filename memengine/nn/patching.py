"""memengine.patch(model): fused layers in place, plus one GradBuffer for every trainable parameter.

Modules are converted by changing their class (memengine.nn.Linear is a subclass of
torch.nn.Linear; Hugging Face's Conv1D gets a subclass with Conv1DFusedMixin), so the very same
Parameter objects stay in place: nothing is copied, state_dict keys and optimizer references
are unchanged. unpatch(model) restores the original classes and releases the buffer.

copy.deepcopy(patched model) gives an unpatched copy: its parameters are new tensors without
main_grad, its fused layers run as plain torch layers, and memengine.patch(copy) (or
memengine.Engine(copy)) builds its own GradBuffer.
"""

import torch

from memengine.grad import GradBuffer
from memengine.nn.conv1d import Conv1DFusedMixin
from memengine.nn.embedding import Embedding
from memengine.nn.embedding import convertible as convertible_embedding
from memengine.nn.linear import Linear

_FUSED_CONV1D_CLASSES = {}  # original Conv1D class -> its fused subclass


def _is_hf_conv1d(module):
    """transformers.pytorch_utils.Conv1D (GPT-2), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor)


def _fused_class(module):
    cls = type(module)
    if cls is torch.nn.Linear:
        return Linear
    if convertible_embedding(module):
        return Embedding
    if _is_hf_conv1d(module):
        if cls not in _FUSED_CONV1D_CLASSES:
            _FUSED_CONV1D_CLASSES[cls] = type("FusedConv1D", (Conv1DFusedMixin, cls), {})
        return _FUSED_CONV1D_CLASSES[cls]
    return None


class _PatchRecord:
    """What patch() leaves on the model: its GradBuffer. A deep copy of the model gets an empty
    record (sharing or copying the buffer would leave the copy's parameters uncovered)."""

    def __init__(self, buffer):
        self.buffer = buffer

    def __deepcopy__(self, memo):
        return _PatchRecord(None)


def patch(model, bucket_bytes=None, bucket_multiple=1):
    """Swaps nn.Linear and Hugging Face Conv1D modules of `model` for fused versions in place and
    attaches one GradBuffer covering every trainable parameter; returns it. Idempotent: a second
    call returns the same buffer. bucket_bytes, bucket_multiple: the buffer's bucket layout for data
    parallelism (see GradBuffer); a model patched with another layout is refused."""
    record = getattr(model, "_memengine_grad_buffer", None)
    if record is not None and record.buffer is not None:
        buffer = record.buffer
        if (buffer.bucket_bytes, buffer.bucket_multiple) != (bucket_bytes, bucket_multiple):
            raise ValueError(
                f"memengine.patch: the model is already patched with buckets of bucket_bytes={buffer.bucket_bytes}, "
                f"bucket_multiple={buffer.bucket_multiple}, not bucket_bytes={bucket_bytes}, "
                f"bucket_multiple={bucket_multiple} (data parallelism lays the gradient buffer out in buckets split "
                "evenly across ranks). Pass the model unpatched (memengine.unpatch(model) first), or build it with "
                "the same settings"
            )
        return buffer
    # First: the buffer refuses what it cannot serve before anything is changed.
    buffer = GradBuffer(model, bucket_bytes=bucket_bytes, bucket_multiple=bucket_multiple)
    for module in model.modules():
        fused = _fused_class(module)
        if fused is not None:
            module._memengine_original_class = type(module)
            module.__class__ = fused
    model._memengine_grad_buffer = _PatchRecord(buffer)
    return buffer


def is_fused(module):
    """Whether `module` runs memengine's fused backward (a patched nn.Linear, Hugging Face Conv1D or nn.Embedding):
    its weight (and bias) gradients are accumulated in fp32 straight into the buffer, not produced by autograd."""
    return isinstance(module, (Linear, Conv1DFusedMixin, Embedding))


def unpatch(model):
    """Restores the original module classes and releases the GradBuffer that patch() attached.
    Refused (RuntimeError) while a memengine.Engine built on the model is alive: it accumulates
    into that buffer. Engines list themselves, weakly, in model._memengine_engines."""
    live_engines = list(model.__dict__.get("_memengine_engines", ()))
    if live_engines:
        raise RuntimeError(
            f"unpatch: the model is trained by a live memengine.Engine ({live_engines[0]!r}) that accumulates "
            "into the GradBuffer unpatch would release; call engine.close() first (or delete the Engine)"
        )
    for module in model.modules():
        original = module.__dict__.pop("_memengine_original_class", None)
        if original is not None:
            module.__class__ = original
    record = model.__dict__.pop("_memengine_grad_buffer", None)
    if record is not None and record.buffer is not None:
        record.buffer.release()
