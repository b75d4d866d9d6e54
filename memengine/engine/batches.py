"""Splitting a batch (a tensor, or a tuple, list or dict of tensors) into micro-batches."""

import torch


def split_batch(batch, micro_batch_size):
    """Micro-batches of `batch` along dim 0 (views, no copies)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(micro_batch_size))
    if isinstance(batch, dict):
        keys = list(batch)
        parts = [split_batch(batch[k], micro_batch_size) for k in keys]
        _check_same_count(parts, keys)
        return [dict(zip(keys, values, strict=True)) for values in zip(*parts, strict=True)]
    if isinstance(batch, (tuple, list)):
        parts = [split_batch(item, micro_batch_size) for item in batch]
        _check_same_count(parts, range(len(batch)))
        return [type(batch)(values) for values in zip(*parts, strict=True)]
    raise TypeError(f"Engine.step: a batch must be a tensor, tuple, list or dict of tensors, got {type(batch)}")


def _check_same_count(parts, names):
    counts = {len(p) for p in parts}
    if len(counts) > 1:
        sizes = {name: len(p) for name, p in zip(names, parts, strict=True)}
        raise ValueError(
            f"Engine.step: the batch's tensors do not split into the same number of micro-batches: {sizes}"
        )
