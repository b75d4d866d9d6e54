"""Op schemas (namespace "memengine"), their pure-PyTorch reference kernels and fake kernels.

Each op is defined here once. The reference kernel is registered for every device
(CompositeExplicitAutograd), so the op exists even without the compiled extension; the
C++/CUDA kernels in csrc/ register for the CPU and CUDA dispatch keys and take precedence.
The reference kernels are also the test oracle and the benchmark baseline.

alpha is split in two arguments because a schema cannot take "float or Tensor":
`alpha` (a float) is used unless `alpha_tensor` (a 0-dim float32 tensor) is given.
"""

import torch

from memengine._validation import check_accumulate_args, check_multi_accumulate_args

_lib = torch.library.Library("memengine", "DEF")  # noqa: TOR901 - the namespace is ours

_lib.define(
    "accumulate_(Tensor(a!) dst, Tensor src, float alpha=1.0, Tensor? alpha_tensor=None, bool overwrite=False) -> ()"
)
_lib.define(
    "multi_accumulate_(Tensor(a!)[] dsts, Tensor[] srcs, float alpha=1.0, Tensor? alpha_tensor=None, "
    "bool overwrite=False) -> ()"
)


def accumulate_reference_(dst, src, alpha=1.0, alpha_tensor=None, overwrite=False):
    """dst <- (0 if overwrite else dst) + alpha * float(src), in eager PyTorch."""
    check_accumulate_args(dst, src, alpha_tensor)
    _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite)


def multi_accumulate_reference_(dsts, srcs, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_multi_accumulate_args(dsts, srcs, alpha_tensor)
    for dst, src in zip(dsts, srcs, strict=True):
        _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite)


def _accumulate_pair_reference(dst, src, alpha, alpha_tensor, overwrite):
    if dst.numel() == 0:
        return
    if alpha_tensor is None:
        if overwrite:
            torch.mul(src.to(torch.float32), alpha, out=dst)
        else:
            dst.add_(src, alpha=alpha)
        return
    scaled = src.to(torch.float32) * alpha_tensor.to(dst.device)
    if overwrite:
        dst.copy_(scaled)
    else:
        dst.add_(scaled)


_lib.impl("accumulate_", accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("multi_accumulate_", multi_accumulate_reference_, "CompositeExplicitAutograd")


def accumulate_fake(dst, src, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_accumulate_args(dst, src, alpha_tensor, check_memory=False)


def multi_accumulate_fake(dsts, srcs, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_multi_accumulate_args(dsts, srcs, alpha_tensor, check_memory=False)


torch.library.register_fake("memengine::accumulate_", accumulate_fake)
torch.library.register_fake("memengine::multi_accumulate_", multi_accumulate_fake)
