"""Argument checks of the Python kernels (reference, Triton, fake), worded like the C++ ones
in csrc/include/memengine/checks.h so that every backend rejects bad input the same way."""

import bisect
import math

import torch

SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(op, message):
    raise ValueError(f"{op}: {message}")


def _span(t):
    """Byte range [begin, end) that a tensor's elements occupy."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    begin = t.data_ptr()
    return begin, begin + (last + 1) * t.element_size()


def _share_bytes(a, b):
    """True if a and b touch a common byte (judged by the ranges their elements span). Meta tensors (a
    prediction's) have no bytes: never."""
    if a.is_meta or b.is_meta:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a_begin, a_end), (b_begin, b_end) = _span(a), _span(b)
    return a_begin < b_end and b_begin < a_end


def check_no_internal_overlap(op, written, name):
    """A tensor a kernel writes must own each of its elements: with internal overlap (an expand()ed
    view) several outputs land on one element, a data race on CUDA and a wrong sum on the CPU."""
    if torch._debug_has_internal_overlap(written) == 1:  # 1: MemOverlap::Yes
        _fail(
            op,
            f"{name} has elements that share memory (for example a view made by expand()); "
            f"pass a tensor that owns each element, e.g. {name}.contiguous()",
        )


def check_accumulate_pair(op, dst, src, dst_name, src_name, check_memory=True):
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor):
        _fail(op, f"{dst_name} and {src_name} must be tensors")
    if dst.dtype != torch.float32:
        _fail(
            op,
            f"{dst_name} must be float32 (the fp32 gradient buffer), got {dst.dtype}; "
            "allocate it with dtype=torch.float32",
        )
    if src.dtype not in SOURCE_DTYPES:
        _fail(
            op,
            f"{src_name} must be float32, bfloat16 or float16, got {src.dtype}; "
            "integer and complex tensors are not gradients memengine can accumulate",
        )
    if src.device != dst.device:
        _fail(
            op,
            f"{src_name} is on {src.device} but {dst_name} is on {dst.device}; move {src_name} to {dst_name}'s device",
        )
    if src.shape != dst.shape:
        _fail(
            op,
            f"{src_name} has shape {list(src.shape)} but {dst_name} has shape {list(dst.shape)}; "
            "shapes must match exactly (no broadcasting)",
        )
    if not check_memory or dst.numel() == 0:
        return
    check_no_internal_overlap(op, dst, dst_name)
    same_view = dst.data_ptr() == src.data_ptr() and dst.stride() == src.stride() and dst.dtype == src.dtype
    if not same_view and _share_bytes(dst, src):
        _fail(op, f"{dst_name} and {src_name} overlap in memory; pass a copy of {src_name} ({src_name}.clone())")


def check_scalar_tensor(op, tensor, device, name="alpha"):
    """A scalar argument (alpha, scale): a Python float or a 0-dim float32 tensor on `device` or the CPU."""
    if tensor is None:
        return
    if tensor.dim() != 0 or tensor.dtype != torch.float32:
        _fail(
            op,
            f"{name} must be a Python float or a 0-dim float32 tensor, got a {tensor.dtype} tensor of "
            f"shape {list(tensor.shape)}; use {name}.reshape(()).float()",
        )
    if tensor.device != device and tensor.device.type != "cpu":
        _fail(op, f"{name} is on {tensor.device} but the gradients are on {device}; move {name} to {device}")


def check_same_length(op, dsts, srcs):
    if len(dsts) != len(srcs):
        _fail(op, f"dsts has {len(dsts)} tensors but srcs has {len(srcs)}; pass one source per destination")


def check_multi_disjoint(op, dsts, srcs):
    """No destination may overlap another destination or another pair's source (the CUDA and
    Triton kernels may process pairs concurrently)."""
    spans = sorted((_span(t) + (i,)) for i, t in enumerate(dsts) if t.numel() > 0)
    for (_, previous_end, previous), (begin, _, index) in zip(spans, spans[1:], strict=False):
        if begin < previous_end:
            _fail(
                op, f"dsts[{previous}] and dsts[{index}] overlap in memory; every destination must be a separate region"
            )
    ends = [end for _, end, _ in spans]  # disjoint spans sorted by begin are sorted by end too
    for j, src in enumerate(srcs):
        if src.numel() == 0:
            continue
        src_begin, src_end = _span(src)
        for begin, _, index in spans[bisect.bisect_right(ends, src_begin) :]:
            if begin >= src_end:
                break
            if index != j:
                _fail(op, f"srcs[{j}] overlaps dsts[{index}] in memory; pass a copy of srcs[{j}]")


def check_accumulate_args(dst, src, alpha_tensor, check_memory=True):
    """All checks of one accumulate_ call."""
    check_accumulate_pair("accumulate_", dst, src, "dst", "src", check_memory)
    check_scalar_tensor("accumulate_", alpha_tensor, dst.device)


def check_multi_accumulate_args(dsts, srcs, alpha_tensor, check_memory=True):
    """All checks of one multi_accumulate_ call."""
    op = "multi_accumulate_"
    check_same_length(op, dsts, srcs)
    for i, (dst, src) in enumerate(zip(dsts, srcs, strict=True)):
        check_accumulate_pair(op, dst, src, f"dsts[{i}]", f"srcs[{i}]", check_memory)
    if check_memory:
        check_multi_disjoint(op, dsts, srcs)
    if dsts:
        check_scalar_tensor(op, alpha_tensor, dsts[0].device)


def check_flat_buffer(op, flat):
    if not isinstance(flat, torch.Tensor):
        _fail(op, "flat must be a tensor")
    if flat.dtype != torch.float32:
        _fail(op, f"flat must be float32 (the fp32 gradient buffer), got {flat.dtype}")
    if not flat.is_contiguous():
        _fail(op, "flat must be contiguous (a GradBuffer's data is); pass flat.contiguous() and copy back")


def check_grad_stats_args(flat, scale_tensor):
    check_flat_buffer("grad_stats_", flat)
    check_scalar_tensor("grad_stats_", scale_tensor, flat.device, "scale")


def check_clip_args(flat, stats, max_norm):
    check_flat_buffer("clip_", flat)
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.float32 or stats.shape != (2,):
        _fail("clip_", "stats must be the float32 tensor [2] returned by grad_stats_ (norm, non-finite count)")
    if stats.device != flat.device:
        _fail("clip_", f"stats is on {stats.device} but flat is on {flat.device}")
    if not max_norm > 0:
        _fail("clip_", f"max_norm must be positive, got {max_norm}")


def check_bias_grad_args(main_grad, grad_output, alpha_tensor, check_memory=True):
    op = "bias_grad_accumulate_"
    if not isinstance(main_grad, torch.Tensor) or not isinstance(grad_output, torch.Tensor):
        _fail(op, "main_grad and grad_output must be tensors")
    if main_grad.dtype != torch.float32:
        _fail(op, f"main_grad must be float32, got {main_grad.dtype}")
    if main_grad.dim() != 1:
        _fail(op, f"main_grad must be 1-D [out], got shape {list(main_grad.shape)}")
    if grad_output.dtype not in SOURCE_DTYPES:
        _fail(op, f"grad_output must be float32, bfloat16 or float16, got {grad_output.dtype}")
    if grad_output.dim() < 1 or grad_output.shape[-1] != main_grad.shape[0]:
        _fail(
            op,
            f"grad_output's last dimension must equal main_grad's size {main_grad.shape[0]}, "
            f"got grad_output of shape {list(grad_output.shape)}",
        )
    if grad_output.device != main_grad.device:
        _fail(op, f"grad_output is on {grad_output.device} but main_grad is on {main_grad.device}")
    if check_memory and main_grad.numel() > 0:
        check_no_internal_overlap(op, main_grad, "main_grad")
        if grad_output.numel() > 0 and _share_bytes(main_grad, grad_output):
            _fail(op, "main_grad and grad_output overlap in memory; pass a copy of grad_output")
    check_scalar_tensor(op, alpha_tensor, main_grad.device)


def check_wgrad_args(main_grad, grad_output, input, alpha_tensor, check_memory=True):
    """All checks of one wgrad_accumulate_ call (mirrors csrc/include/memengine/wgrad_checks.h)."""
    op = "wgrad_accumulate_"
    if not all(isinstance(t, torch.Tensor) for t in (main_grad, grad_output, input)):
        _fail(op, "main_grad, grad_output and input must be tensors")
    if main_grad.dtype != torch.float32:
        _fail(op, f"main_grad must be float32 (the fp32 gradient buffer), got {main_grad.dtype}")
    if main_grad.dim() != 2:
        _fail(op, f"main_grad must be 2-D [out, in], got shape {list(main_grad.shape)}")
    for name, t in (("grad_output", grad_output), ("input", input)):
        if t.dtype not in SOURCE_DTYPES:
            _fail(op, f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if grad_output.dtype != input.dtype:
        _fail(
            op,
            f"grad_output is {grad_output.dtype} but input is {input.dtype}; both must have the same dtype "
            "(cast one of them, e.g. input.to(grad_output.dtype))",
        )
    out_features, in_features = main_grad.shape
    if grad_output.dim() < 1 or grad_output.shape[-1] != out_features:
        _fail(
            op,
            f"grad_output's last dimension must equal main_grad.shape[0] = {out_features}, "
            f"got grad_output of shape {list(grad_output.shape)}",
        )
    if input.dim() < 1 or input.shape[-1] != in_features:
        _fail(
            op,
            f"input's last dimension must equal main_grad.shape[1] = {in_features}, "
            f"got input of shape {list(input.shape)}",
        )
    if math.prod(grad_output.shape[:-1]) != math.prod(input.shape[:-1]):
        _fail(
            op,
            f"grad_output (shape {list(grad_output.shape)}) and input (shape {list(input.shape)}) must hold the "
            "same number of tokens (the product of all dimensions but the last)",
        )
    for name, t in (("grad_output", grad_output), ("input", input)):
        if t.device != main_grad.device:
            _fail(op, f"{name} is on {t.device} but main_grad is on {main_grad.device}")
    if main_grad.numel() > 0 and (main_grad.stride(1) != 1 or main_grad.stride(0) < in_features):
        _fail(
            op,
            f"main_grad must be a row-major matrix (strides (>= {in_features}, 1)), got strides "
            f"{list(main_grad.stride())}; pass a contiguous buffer or a row/column slice of one",
        )
    if check_memory and main_grad.numel() > 0:
        for name, t in (("grad_output", grad_output), ("input", input)):
            if t.numel() > 0 and _share_bytes(main_grad, t):
                _fail(op, f"main_grad and {name} overlap in memory; pass a copy of {name}")
    check_scalar_tensor(op, alpha_tensor, main_grad.device)


def check_cross_entropy_tile_args(op, logits, bias, labels, start, softcap, per_row, check_memory=True):
    """All checks of one cross_entropy_tile_forward_/backward_ call (mirrors
    csrc/include/memengine/cross_entropy_tile_checks.h). per_row: {name: tensor or None}, the float32 [rows]
    tensors the op reads or writes besides logits."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        _fail(op, "logits and labels must be tensors")
    if logits.dtype != torch.float32 or logits.dim() != 2:
        _fail(op, f"logits must be a float32 [tile, rows] tensor, got {logits.dtype} of shape {list(logits.shape)}")
    if not logits.is_contiguous():
        _fail(op, "logits must be contiguous (the kernel rewrites it in place); pass logits.contiguous()")
    tile, rows = logits.shape
    if labels.dtype != torch.int64 or labels.shape != (rows,):
        _fail(op, f"labels must be int64 [rows] = [{rows}], got {labels.dtype} of shape {list(labels.shape)}")
    if start < 0:
        _fail(op, f"start (the tile's first vocabulary entry) must be non-negative, got {start}")
    if not (softcap >= 0 and math.isfinite(softcap)):
        _fail(op, f"softcap must be positive, or 0 for no cap, got {softcap}")
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (tile,)):
        _fail(op, f"bias must be float32 [tile] = [{tile}], got {bias.dtype} of shape {list(bias.shape)}")
    for name, t in [("labels", labels), ("bias", bias)] + list(per_row.items()):
        if t is None:
            continue
        if t.device != logits.device:
            _fail(op, f"{name} is on {t.device} but logits is on {logits.device}")
        if name in per_row and (t.dtype != torch.float32 or t.shape != (rows,) or not t.is_contiguous()):
            _fail(
                op,
                f"{name} must be a contiguous float32 [rows] = [{rows}] tensor, got {t.dtype} of shape {list(t.shape)}",
            )
    if check_memory and logits.numel():
        for name, t in per_row.items():
            if t is not None and t.numel() and _share_bytes(logits, t):
                _fail(op, f"logits and {name} overlap in memory; pass separate tensors")


def check_cross_entropy_tile_forward_args(
    logits, bias, labels, start, softcap, running_max, running_sum, target, logit_sum, check_memory=True
):
    per_row = {"running_max": running_max, "running_sum": running_sum, "target": target, "logit_sum": logit_sum}
    check_cross_entropy_tile_args(
        "cross_entropy_tile_forward_", logits, bias, labels, start, softcap, per_row, check_memory
    )


def check_cross_entropy_tile_backward_args(
    logits, bias, labels, start, softcap, lse, probability_scale, row_scale, check_memory=True
):
    per_row = {"lse": lse, "probability_scale": probability_scale, "row_scale": row_scale}
    check_cross_entropy_tile_args(
        "cross_entropy_tile_backward_", logits, bias, labels, start, softcap, per_row, check_memory
    )
