"""cross_entropy_tile_forward_ / cross_entropy_tile_backward_: every backend (and every CPU instruction set of the
C++ kernel) against a float64 oracle of the formulas in csrc/include/memengine/cross_entropy_tile.h, within the
DESIGN.md tolerance: error at most 2x the pure-PyTorch reference kernel's on the same input, plus a few float32
roundings of the result. Bad input, empty tiles, NaN, opcheck."""

import math

import pytest
import torch
from conftest import backends_for, cpu_isas, requires_cuda

import memengine as me

# (tile, rows): one token, a ragged AVX-512 block, several blocks, odd sizes, a tile of one entry.
SHAPES = [(1, 1), (5, 3), (33, 17), (300, 70), (1000, 129), (1, 40)]
# (bias, logit_scale, softcap): plain, a bias, Cohere's logit scale, Gemma 2's softcap with all three.
TRANSFORMS = [(False, 1.0, 0.0), (True, 1.0, 0.0), (False, 0.0625, 0.0), (True, 0.5, 30.0)]
START = 7
IGNORE = -100


def generator(seed):
    return torch.Generator().manual_seed(seed)


def make_case(tile, rows, bias, device="cpu", seed=0):
    g = generator(seed)
    logits = (torch.randn(tile, rows, generator=g) * 8).to(device)
    # Labels in the tile, before and after it, and ignored.
    labels = torch.randint(START - 3, START + tile + 3, (rows,), generator=g)
    labels[::5] = IGNORE
    bias_tensor = torch.randn(tile, generator=g).to(device) if bias else None
    # A running state as left by an earlier tile (and a fresh one for the first row).
    running_max = (torch.randn(rows, generator=g) * 4).to(device)
    running_sum = (torch.rand(rows, generator=g) * 50).to(device)
    running_max[:1], running_sum[:1] = float("-inf"), 0.0
    per_row = {name: torch.randn(rows, generator=g).to(device) for name in ("target", "logit_sum", "lse", "row_scale")}
    per_row["lse"] = per_row["lse"].abs() * 4 + 10
    per_row["probability_scale"] = per_row["row_scale"] * 1.25
    return logits, labels.to(device), bias_tensor, running_max, running_sum, per_row


def transformed64(logits, bias, scale, softcap):
    z = logits.double()
    if bias is not None:
        z = z + bias.double()[:, None]
    z = z * scale
    capped = torch.tanh(z / softcap) if softcap else None
    return (capped * softcap if softcap else z), capped


def forward_oracle(logits, labels, bias, scale, softcap, running_max, running_sum, target, logit_sum):
    z, _ = transformed64(logits, bias, scale, softcap)
    tile = z.shape[0]
    index = labels - START
    inside = (index >= 0) & (index < tile)
    label_z = torch.where(inside, z.gather(0, torch.where(inside, index, 0)[None, :]).squeeze(0), 0.0)
    new_max = torch.maximum(running_max.double(), z.max(0).values)
    new_sum = running_sum.double() * torch.exp(running_max.double() - new_max) + torch.exp(z - new_max).sum(0)
    return {
        "logits": z,
        "running_max": new_max,
        "running_sum": new_sum,
        "target": target.double() + label_z,
        "logit_sum": logit_sum.double() + z.sum(0),
    }


def backward_oracle(logits, labels, bias, scale, softcap, lse, probability_scale, row_scale, uniform, target_weight):
    z, capped = transformed64(logits, bias, scale, softcap)
    gradient = torch.exp(z - lse.double()) * probability_scale.double() - uniform * row_scale.double()
    is_label = (torch.arange(z.shape[0])[:, None] + START) == labels[None, :].cpu()
    gradient = gradient - is_label.to(gradient.device) * (target_weight * row_scale.double())
    if capped is not None:
        gradient = gradient * (1 - capped * capped)
    return gradient * scale


def run_forward(logits, labels, bias, scale, softcap, running_max, running_sum, per_row, with_logit_sum=True):
    out = {
        "logits": logits.clone(),
        "running_max": running_max.clone(),
        "running_sum": running_sum.clone(),
        "target": per_row["target"].clone(),
        "logit_sum": per_row["logit_sum"].clone() if with_logit_sum else None,
    }
    me.ops.cross_entropy_tile_forward_(
        out["logits"],
        labels,
        START,
        out["running_max"],
        out["running_sum"],
        out["target"],
        out["logit_sum"],
        bias=bias,
        logit_scale=scale,
        softcap=softcap or None,
    )
    return out


def run_backward(logits, labels, bias, scale, softcap, per_row, uniform, target_weight):
    gradient = logits.clone()
    me.ops.cross_entropy_tile_backward_(
        gradient,
        labels,
        START,
        per_row["lse"],
        per_row["probability_scale"],
        per_row["row_scale"],
        uniform=uniform,
        target_weight=target_weight,
        bias=bias,
        logit_scale=scale,
        softcap=softcap or None,
    )
    return gradient


def assert_close_to_oracle(name, result, reference, oracle):
    """|result - oracle| <= 2 |reference - oracle| (its largest) + 8 float32 roundings of the oracle."""
    result, reference, oracle = result.double().cpu(), reference.double().cpu(), oracle.double().cpu()
    error = (result - oracle).abs()
    allowed = 2 * (reference - oracle).abs().max() + 8 * 2**-24 * oracle.abs() + 1e-30
    assert (error <= allowed).all(), f"{name}: max error {error.max().item():.3g}, reference's {allowed.max():.3g}"


def check_backend(use_backend, backend, shape, transform, device="cpu"):
    tile, rows = shape
    bias, scale, softcap = transform
    logits, labels, bias, running_max, running_sum, per_row = make_case(tile, rows, bias, device)
    uniform, target_weight = 0.1 / 50_000, 0.9
    use_backend("torch")
    reference_forward = run_forward(logits, labels, bias, scale, softcap, running_max, running_sum, per_row)
    reference_backward = run_backward(logits, labels, bias, scale, softcap, per_row, uniform, target_weight)
    use_backend(backend)
    forward = run_forward(logits, labels, bias, scale, softcap, running_max, running_sum, per_row)
    backward = run_backward(logits, labels, bias, scale, softcap, per_row, uniform, target_weight)
    oracle = forward_oracle(
        logits.cpu(),
        labels.cpu(),
        *(t if t is None else t.cpu() for t in (bias,)),
        scale,
        softcap,
        running_max.cpu(),
        running_sum.cpu(),
        per_row["target"].cpu(),
        per_row["logit_sum"].cpu(),
    )
    for name in oracle:
        assert_close_to_oracle(name, forward[name], reference_forward[name], oracle[name])
    lse = oracle["running_max"] + torch.log(oracle["running_sum"])
    assert torch.isfinite(lse).all()
    gradient_oracle = backward_oracle(
        logits.cpu(),
        labels.cpu(),
        None if bias is None else bias.cpu(),
        scale,
        softcap,
        *(per_row[k].cpu() for k in ("lse", "probability_scale", "row_scale")),
        uniform,
        target_weight,
    )
    assert_close_to_oracle("gradient", backward, reference_backward, gradient_oracle)


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "bias", "scale", "bias-scale-softcap"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_oracle(use_backend, backend, shape, transform):
    check_backend(use_backend, backend, shape, transform)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("transform", TRANSFORMS[1:], ids=["bias", "scale", "bias-scale-softcap"])
def test_every_cpu_isa(use_backend, cpu_isa, transform):
    for shape in [(300, 70), (64, 16), (7, 1)]:
        check_backend(use_backend, "cpp", shape, transform)


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
def test_without_logit_sum_and_deterministic(use_backend, backend):
    use_backend(backend)
    logits, labels, bias, running_max, running_sum, per_row = make_case(200, 50, True)
    first = run_forward(logits, labels, bias, 1.0, 0.0, running_max, running_sum, per_row, with_logit_sum=False)
    second = run_forward(logits, labels, bias, 1.0, 0.0, running_max, running_sum, per_row, with_logit_sum=True)
    for name in ("logits", "running_max", "running_sum", "target"):
        assert torch.equal(first[name], second[name]), name
    again = run_backward(logits, labels, bias, 1.0, 0.0, per_row, 0.0, 1.0)
    assert torch.equal(again, run_backward(logits, labels, bias, 1.0, 0.0, per_row, 0.0, 1.0))


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
def test_extreme_logits_and_nan(use_backend, backend):
    """Logits of 1e4 (a naive exp overflows) and -inf give the oracle's log-sum-exp; a NaN logit makes its token's
    log-sum-exp and gradient NaN, never a finite number."""
    use_backend(backend)
    logits, labels, _, _, _, per_row = make_case(64, 20, False)
    logits[:, 3] += 1e4
    logits[5:, 4] = float("-inf")
    logits[9, 6] = float("nan")
    running_max, running_sum = torch.full((20,), float("-inf")), torch.zeros(20)
    out = run_forward(logits, labels, None, 1.0, 0.0, running_max, running_sum, per_row)
    lse = out["running_max"] + torch.log(out["running_sum"])
    finite_logits = logits.clone()
    finite_logits[:, 6] = 0.0
    expected = torch.logsumexp(finite_logits.double(), 0)
    keep = torch.ones(20, dtype=torch.bool)
    keep[6] = False
    torch.testing.assert_close(lse[keep].double(), expected[keep], rtol=1e-6, atol=0)
    assert math.isnan(lse[6].item())
    per_row["lse"] = lse
    gradient = run_backward(logits, labels, None, 1.0, 0.0, per_row, 0.0, 1.0)
    assert torch.isnan(gradient[9, 6]) and torch.isfinite(gradient[:, keep]).all()


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
def test_empty_tiles_change_nothing(use_backend, backend):
    use_backend(backend)
    for tile, rows in [(0, 5), (5, 0), (0, 0)]:
        logits, labels, _, running_max, running_sum, per_row = make_case(max(tile, 1), rows, False)
        logits = logits[:tile].contiguous()
        out = run_forward(logits, labels, None, 1.0, 0.0, running_max, running_sum, per_row)
        assert torch.equal(out["running_max"], running_max) and torch.equal(out["target"], per_row["target"])
        run_backward(logits, labels, None, 1.0, 0.0, per_row, 0.0, 1.0)


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
def test_strided_labels_and_bias(use_backend, backend):
    """labels and bias may be views with strides (they are read only); the result equals the contiguous call's."""
    use_backend(backend)
    logits, labels, bias, running_max, running_sum, per_row = make_case(40, 30, True)
    wide_labels = torch.stack([labels, labels]).t()  # [30, 2]: column 0 has stride 2
    wide_bias = torch.stack([bias, bias]).t()
    strided = run_forward(logits, wide_labels[:, 0], wide_bias[:, 0], 1.0, 0.0, running_max, running_sum, per_row)
    plain = run_forward(logits, labels, bias, 1.0, 0.0, running_max, running_sum, per_row)
    for name in plain:
        assert torch.equal(strided[name], plain[name]), name


def bad_calls():
    """(description, forward arguments as a dict to update, expected message fragment)."""
    return [
        ("bf16 logits", {"logits": torch.zeros(4, 3, dtype=torch.bfloat16)}, "logits must be a float32"),
        ("1-D logits", {"logits": torch.zeros(12)}, "logits must be a float32"),
        ("transposed logits", {"logits": torch.zeros(3, 4).t()}, "logits must be contiguous"),
        ("int32 labels", {"labels": torch.zeros(3, dtype=torch.int32)}, "labels must be int64"),
        ("labels too short", {"labels": torch.zeros(2, dtype=torch.int64)}, "labels must be int64 [rows] = [3]"),
        ("bias of the wrong length", {"bias": torch.zeros(5)}, "bias must be float32 [tile] = [4]"),
        ("bf16 bias", {"bias": torch.zeros(4, dtype=torch.bfloat16)}, "bias must be float32"),
        ("running_max too long", {"running_max": torch.zeros(4)}, "running_max must be a contiguous float32 [rows]"),
        ("strided target", {"target": torch.zeros(6)[::2]}, "target must be a contiguous float32 [rows]"),
        ("fp64 running_sum", {"running_sum": torch.zeros(3, dtype=torch.float64)}, "running_sum must be"),
        ("negative start", {"start": -1}, "start"),
        ("negative softcap", {"softcap": -1.0}, "softcap must be positive"),
        ("labels on meta", {"labels": torch.zeros(3, dtype=torch.int64, device="meta")}, "labels is on meta"),
    ]


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
@pytest.mark.parametrize("case", bad_calls(), ids=lambda case: case[0])
def test_bad_input_raises_value_error_naming_the_argument(use_backend, backend, case):
    use_backend(backend)
    _, update, fragment = case
    arguments = {
        "logits": torch.zeros(4, 3),
        "labels": torch.zeros(3, dtype=torch.int64),
        "start": 0,
        "running_max": torch.zeros(3),
        "running_sum": torch.zeros(3),
        "target": torch.zeros(3),
        "logit_sum": None,
        "bias": None,
        "logit_scale": 1.0,
        "softcap": None,
    }
    arguments.update(update)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        me.ops.cross_entropy_tile_forward_(**arguments)
    backward = {k: arguments[k] for k in ("logits", "labels", "start", "bias", "logit_scale", "softcap")}
    backward.update(lse=torch.zeros(3), probability_scale=torch.zeros(3), row_scale=torch.zeros(3))
    for name in ("running_max", "target", "running_sum"):
        if name in update:  # the per-row tensors of the backward, with the same fault
            backward["lse"] = update[name]
            fragment = fragment.replace(name, "lse")
    if "logit_sum" not in update:
        with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            me.ops.cross_entropy_tile_backward_(**backward)


@pytest.mark.parametrize("backend", backends_for("cpu", "cross_entropy_tile_forward_"))
def test_overlapping_logits_and_row_tensor_is_refused(use_backend, backend):
    use_backend(backend)
    storage = torch.zeros(4 * 3 + 3)
    logits, running_max = storage[:12].view(4, 3), storage[10:13]
    with pytest.raises(ValueError, match="logits and running_max overlap"):
        me.ops.cross_entropy_tile_forward_(
            logits, torch.zeros(3, dtype=torch.int64), 0, running_max, torch.zeros(3), torch.zeros(3)
        )


@pytest.mark.parametrize("prefix", ["", "_triton_"])
def test_opcheck(prefix):
    from memengine import triton as triton_backend

    reason = triton_backend.unavailable_reason("cross_entropy_tile_forward_", "cpu")
    if prefix and reason:
        pytest.skip(f"Triton unavailable on CPU: {reason}")
    forward = getattr(torch.ops.memengine, prefix + "cross_entropy_tile_forward_").default
    backward = getattr(torch.ops.memengine, prefix + "cross_entropy_tile_backward_").default
    for bias, scale, softcap in TRANSFORMS:
        logits, labels, bias_tensor, running_max, running_sum, per_row = make_case(37, 21, bias)
        torch.library.opcheck(
            forward,
            (logits, bias_tensor, labels, START, scale, softcap, running_max, running_sum, per_row["target"], None),
        )
        torch.library.opcheck(
            backward,
            (
                logits,
                bias_tensor,
                labels,
                START,
                scale,
                softcap,
                per_row["lse"],
                per_row["probability_scale"],
                per_row["row_scale"],
                1e-5,
                0.9,
            ),
        )


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda", "cross_entropy_tile_forward_"))
@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "bias", "scale", "bias-scale-softcap"])
def test_cuda_matches_oracle(use_backend, backend, transform):
    for shape in SHAPES + [(4096, 1024), (3, 70_000)]:
        check_backend(use_backend, backend, shape, transform, device="cuda")
