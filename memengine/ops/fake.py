"""Fake (meta) kernels: shape and argument checks only, for torch.compile and the meta device."""

from memengine.ops.validation import (
    check_accumulate_args,
    check_bias_grad_args,
    check_clip_args,
    check_cross_entropy_tile_backward_args,
    check_cross_entropy_tile_forward_args,
    check_grad_stats_args,
    check_multi_accumulate_args,
    check_wgrad_args,
)


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


def cross_entropy_tile_forward_fake(
    logits, bias, labels, start, logit_scale, softcap, running_max, running_sum, target, logit_sum
):
    check_cross_entropy_tile_forward_args(
        logits, bias, labels, start, softcap, running_max, running_sum, target, logit_sum, check_memory=False
    )


def cross_entropy_tile_backward_fake(
    logits, bias, labels, start, logit_scale, softcap, lse, probability_scale, row_scale, uniform, target_weight
):
    check_cross_entropy_tile_backward_args(
        logits, bias, labels, start, softcap, lse, probability_scale, row_scale, check_memory=False
    )
