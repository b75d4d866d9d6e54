"""Splitting a batch (a tensor, or a tuple, list or Mapping of tensors) into micro-batches."""

import collections.abc

import torch


def split_batch(batch, micro_batch_size):
    """Micro-batches of `batch` along dim 0 (views, no copies).

    batch: a tensor; a tuple or list of batches; or any Mapping (dict, transformers.BatchEncoding)
    whose values are batches or other values. Every tensor is split along dim 0; a Mapping's
    non-tensor values (None, numbers, flags) go unchanged into every micro-batch. Micro-batches
    keep the batch's container types; a Mapping that cannot be built from a dict becomes a dict.
    Every tensor must have the same number of rows (size of dim 0), else ValueError naming each
    tensor's key and row count: splitting them anyway would pair rows of one with rows of another.
    """
    rows = {path: tensor.shape[0] for path, tensor in _tensors(batch).items()}
    if not rows:
        raise TypeError(f"Engine.step: a batch must hold at least one tensor, got {type(batch).__name__}")
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{path}: {count}" for path, count in rows.items())
        raise ValueError(
            "Engine.step: the batch's tensors have different numbers of rows (size of dim 0), so they cannot "
            f"be split into the same micro-batches: {listed}; give every tensor one row per sample"
        )
    return _split(batch, micro_batch_size)


def shape_signature(batch):
    """((path, dtype, shape) of each tensor of `batch`), in order: what a memory plan made for this batch covers."""
    return tuple((path, tensor.dtype, tuple(tensor.shape)) for path, tensor in _tensors(batch).items())


def covers(signature, other):
    """Whether a batch of shape_signature `other` is no larger than one of `signature`: the same tensors, of the
    same dtypes, each no larger in any dimension (so its activations and bytes are no larger either)."""
    return len(signature) == len(other) and all(
        path == other_path
        and dtype == other_dtype
        and len(shape) == len(other_shape)
        and all(size >= other_size for size, other_size in zip(shape, other_shape, strict=True))
        for (path, dtype, shape), (other_path, other_dtype, other_shape) in zip(signature, other, strict=True)
    )


def _tensors(batch, path="batch", found=None):
    """{path of each tensor in batch: the tensor}, refusing what cannot be split into micro-batches."""
    found = {} if found is None else found
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError(
                f"Engine.step: {path} is a 0-dim tensor: it has no rows to split into micro-batches; "
                "give it one row per sample, or pass it to loss_fn some other way (a closure)"
            )
        found[path] = batch
    elif isinstance(batch, collections.abc.Mapping):
        for key, value in batch.items():
            if _holds_tensor(value):
                _tensors(value, f"{path}[{key!r}]", found)
    elif isinstance(batch, (tuple, list)) and batch:
        for index, item in enumerate(batch):
            _tensors(item, f"{path}[{index}]", found)
    else:  # in a tuple or list every item is split, so each must hold a tensor
        raise TypeError(
            "Engine.step: a batch must be a tensor, tuple, list or Mapping of tensors; "
            f"{path} is {'an empty ' if isinstance(batch, (tuple, list)) else 'a '}{type(batch).__name__}"
        )
    return found


def _holds_tensor(value):
    if isinstance(value, collections.abc.Mapping):
        return any(_holds_tensor(item) for item in value.values())
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(item) for item in value)
    return isinstance(value, torch.Tensor)


def _split(batch, micro_batch_size):
    if isinstance(batch, torch.Tensor):
        return list(batch.split(micro_batch_size))
    if isinstance(batch, collections.abc.Mapping):
        keys = [key for key, value in batch.items() if _holds_tensor(value)]
        parts = zip(*(_split(batch[key], micro_batch_size) for key in keys), strict=True)
        return [_same_mapping_type(batch, {**batch, **dict(zip(keys, values, strict=True))}) for values in parts]
    return [type(batch)(values) for values in zip(*(_split(item, micro_batch_size) for item in batch), strict=True)]


def _same_mapping_type(template, items):
    """`items` (a dict) as a mapping of template's type when that type is built from a dict (dict,
    OrderedDict, transformers.BatchEncoding), else the dict itself."""
    try:
        return type(template)(items)
    except TypeError:  # e.g. defaultdict (its first argument is a factory), or a Mapping with its own constructor
        return items
