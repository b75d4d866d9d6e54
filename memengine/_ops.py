"""Op schemas (namespace "memengine"), their pure-PyTorch reference kernels and fake kernels.

Each op is defined here once. The reference kernel is registered for every device
(CompositeExplicitAutograd), so the op exists even without the compiled extension; the
C++/CUDA kernels in csrc/ register for the CPU and CUDA dispatch keys and take precedence.
The reference kernels are also the test oracle and the benchmark baseline.

alpha is split in two arguments because a schema cannot take "float or Tensor":
`alpha` (a float) is used unless `alpha_tensor` (a 0-dim float32 tensor) is given.
"""

import torch

from memengine._validation import (
    check_accumulate_args,
    check_bias_grad_args,
    check_clip_args,
    check_grad_stats_args,
    check_multi_accumulate_args,
    check_wgrad_args,
)

_lib = torch.library.Library("memengine", "DEF")  # noqa: TOR901 - the namespace is ours

_lib.define(
    "accumulate_(Tensor(a!) dst, Tensor src, float alpha=1.0, Tensor? alpha_tensor=None, bool overwrite=False) -> ()"
)
_lib.define(
    "bias_grad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, float alpha=1.0, Tensor? alpha_tensor=None, "
    "bool overwrite=False) -> ()"
)
_lib.define(
    "wgrad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, Tensor input, float alpha=1.0, "
    "Tensor? alpha_tensor=None, bool overwrite=False) -> ()"
)
_lib.define("grad_stats_(Tensor(a!) flat, float scale=1.0, Tensor? scale_tensor=None) -> Tensor")
_lib.define("clip_(Tensor(a!) flat, Tensor stats, float max_norm) -> ()")
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


def bias_grad_accumulate_reference_(main_grad, grad_output, alpha=1.0, alpha_tensor=None, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * grad_output summed over all rows, in float32."""
    check_bias_grad_args(main_grad, grad_output, alpha_tensor)
    column_sums = grad_output.reshape(-1, main_grad.shape[0]).to(torch.float32).sum(0)
    _accumulate_pair_reference(main_grad, column_sums, alpha, alpha_tensor, overwrite)


def wgrad_accumulate_reference_(main_grad, grad_output, input, alpha=1.0, alpha_tensor=None, overwrite=False):
    """main_grad <- (0 if overwrite else main_grad) + alpha * grad_output^T @ input, with both
    flattened to [tokens, features]; products and sums in float32 (inputs are upcast first)."""
    check_wgrad_args(main_grad, grad_output, input, alpha_tensor)
    out_features, in_features = main_grad.shape
    if main_grad.numel() == 0:
        return
    g2 = grad_output.reshape(-1, out_features).to(torch.float32)
    x2 = input.reshape(-1, in_features).to(torch.float32)
    _accumulate_pair_reference(main_grad, g2.t() @ x2, alpha, alpha_tensor, overwrite)


def grad_stats_reference_(flat, scale=1.0, scale_tensor=None):
    """flat *= scale; returns float32 [L2 norm of the finite values (computed in float64),
    number of non-finite values], without leaving the device."""
    check_grad_stats_args(flat, scale_tensor)
    flat.mul_(scale if scale_tensor is None else scale_tensor.to(flat.device))
    finite = torch.isfinite(flat)
    norm = torch.linalg.vector_norm(torch.where(finite, flat, 0.0), dtype=torch.float64)
    nonfinite = finite.numel() - finite.sum()
    return torch.stack([norm.to(torch.float32), nonfinite.to(torch.float32)])


def clip_reference_(flat, stats, max_norm):
    """flat *= min(1, max_norm / (norm + 1e-6)) unless stats counted a non-finite value."""
    check_clip_args(flat, stats, max_norm)
    coefficient = torch.clamp(max_norm / (stats[0] + 1e-6), max=1.0)
    flat.mul_(torch.where(stats[1] > 0, torch.ones_like(coefficient), coefficient))


_lib.impl("accumulate_", accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("bias_grad_accumulate_", bias_grad_accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("wgrad_accumulate_", wgrad_accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("grad_stats_", grad_stats_reference_, "CompositeExplicitAutograd")
_lib.impl("clip_", clip_reference_, "CompositeExplicitAutograd")
_lib.impl("multi_accumulate_", multi_accumulate_reference_, "CompositeExplicitAutograd")


def accumulate_fake(dst, src, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_accumulate_args(dst, src, alpha_tensor, check_memory=False)


def multi_accumulate_fake(dsts, srcs, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_multi_accumulate_args(dsts, srcs, alpha_tensor, check_memory=False)


def bias_grad_accumulate_fake(main_grad, grad_output, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_bias_grad_args(main_grad, grad_output, alpha_tensor, check_memory=False)


def wgrad_accumulate_fake(main_grad, grad_output, input, alpha=1.0, alpha_tensor=None, overwrite=False):
    check_wgrad_args(main_grad, grad_output, input, alpha_tensor, check_memory=False)


def grad_stats_fake(flat, scale=1.0, scale_tensor=None):
    check_grad_stats_args(flat, scale_tensor)
    return flat.new_empty(2)


def clip_fake(flat, stats, max_norm):
    check_clip_args(flat, stats, max_norm)


torch.library.register_fake("memengine::accumulate_", accumulate_fake)
torch.library.register_fake("memengine::bias_grad_accumulate_", bias_grad_accumulate_fake)
torch.library.register_fake("memengine::wgrad_accumulate_", wgrad_accumulate_fake)
torch.library.register_fake("memengine::grad_stats_", grad_stats_fake)
torch.library.register_fake("memengine::clip_", clip_fake)
torch.library.register_fake("memengine::multi_accumulate_", multi_accumulate_fake)
