"""grad_stats_ and clip_: every backend against an fp64 oracle and the reference."""

import pytest
import torch
from conftest import backends_for, cpu_isas, requires_cuda

import memengine as me
from memengine.ops import reference as _ops

SIZES = [1, 15, 16, 17, 1000, 65536, 65537, 300001]


def make(n, seed=0, device="cpu"):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


def ulp(x):
    x = x.abs().to(torch.float32)
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def oracle(flat, scale):
    scaled = flat * torch.tensor(float(scale), dtype=torch.float32)  # the float32 multiply every backend does
    finite = torch.isfinite(scaled)
    norm = scaled[finite].double().pow(2).sum().sqrt()
    return scaled, norm.float(), int((~finite).sum())


@pytest.mark.parametrize("backend", backends_for("cpu", "grad_stats_"))
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("scale_kind", ["one", "float", "tensor"])
def test_grad_stats_matches_oracle(use_backend, backend, n, scale_kind):
    use_backend(backend)
    flat = make(n, n) * 100
    if n > 20:
        flat[3], flat[11], flat[n // 2] = float("nan"), float("inf"), float("-inf")
    scale = {"one": 1.0, "float": 1 / 3, "tensor": torch.tensor(1 / 3)}[scale_kind]
    expected_flat, expected_norm, expected_count = oracle(flat, scale)
    stats = me.ops.grad_stats_(flat, scale)
    assert stats.dtype == torch.float32 and stats.shape == (2,) and stats.device == flat.device
    torch.testing.assert_close(flat, expected_flat, rtol=0, atol=0, equal_nan=True)
    assert abs(stats[0] - expected_norm) <= ulp(expected_norm), (stats[0].item(), expected_norm.item())
    assert stats[1].item() == expected_count


@pytest.mark.parametrize("backend", backends_for("cpu", "grad_stats_"))
def test_grad_stats_is_deterministic(use_backend, backend):
    use_backend(backend)
    flat = make(1_000_003, 1)
    results = []
    for threads in (1, 2, 1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(me.ops.grad_stats_(flat.clone(), 0.5))
        finally:
            torch.set_num_threads(previous)
    for other in results[1:]:
        assert torch.equal(results[0], other)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
def test_grad_stats_every_cpu_isa(use_backend, cpu_isa):
    use_backend("cpp")
    flat = make(200_003, 2)
    flat[7] = float("nan")
    expected_flat, expected_norm, expected_count = oracle(flat, 0.125)
    stats = me.ops.grad_stats_(flat, 0.125)
    torch.testing.assert_close(flat, expected_flat, rtol=0, atol=0, equal_nan=True)
    assert abs(stats[0] - expected_norm) <= ulp(expected_norm)
    assert stats[1].item() == expected_count


@pytest.mark.parametrize("backend", backends_for("cpu", "grad_stats_"))
def test_grad_stats_empty_and_bad_input(use_backend, backend):
    use_backend(backend)
    assert me.ops.grad_stats_(torch.empty(0)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="grad_stats_: flat must be float32"):
        me.ops.grad_stats_(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="grad_stats_: flat must be contiguous"):
        me.ops.grad_stats_(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="grad_stats_: scale must be a Python float or a 0-dim float32 tensor"):
        me.ops.grad_stats_(torch.zeros(4), torch.tensor([0.5]))


@pytest.mark.parametrize("backend", backends_for("cpu", "clip_"))
@pytest.mark.parametrize("case", ["clips", "below-max", "non-finite"])
def test_clip_matches_reference(use_backend, backend, case):
    use_backend(backend)
    flat = make(300_001, 3)
    if case == "non-finite":
        flat[10] = float("nan")
    original = flat.clone()
    max_norm = 1e9 if case == "below-max" else 1.0
    stats = me.ops.grad_stats_(flat.clone())
    expected = flat.clone()
    _ops.clip_reference_(expected, stats, max_norm)
    me.ops.clip_(flat, stats, max_norm)
    torch.testing.assert_close(flat, expected, rtol=0, atol=0, equal_nan=True)
    if case == "clips":
        assert abs(flat.double().norm().item() - 1.0) < 1e-5
    else:  # nothing to clip, or a non-finite value: the step will be skipped, leave it alone
        torch.testing.assert_close(flat, original, rtol=0, atol=0, equal_nan=True)


FLOAT32_MAX = torch.finfo(torch.float32).max
# name: (values, scale, the fp64 norm of the scaled values, whether it exceeds float32's largest value)
LARGE_NORMS = {
    "large but representable": (torch.full((10_000,), 1e30), 1.0),
    "overflowing": (torch.full((100,), 3e38), 1.0),
    "overflowing after scaling": (torch.full((100,), 3e37), 10.0),
    "just above float32 max": (torch.tensor([FLOAT32_MAX, 2.0**110]), 1.0),  # float(norm) would round to max
    "overflowing with a NaN": (torch.cat([torch.full((100,), 3e38), torch.tensor([float("nan")])]), 1.0),
}


@pytest.mark.parametrize("backend", backends_for("cpu", "grad_stats_"))
@pytest.mark.parametrize("case", list(LARGE_NORMS))
def test_norm_beyond_float32_counts_as_nonfinite(use_backend, backend, case):
    """Finite values whose norm float32 cannot hold: the norm is +inf and the non-finite count grows
    by one, so every consumer that skips the step on stats[1] > 0 skips it (clip_ included), instead
    of clipping by max_norm / inf = 0 and stepping with a zeroed gradient."""
    use_backend(backend)
    values, scale = LARGE_NORMS[case]
    expected_flat, _, expected_count = oracle(values, scale)
    norm64 = expected_flat[torch.isfinite(expected_flat)].double().pow(2).sum().sqrt()
    overflows = bool(norm64 > FLOAT32_MAX)
    assert overflows == (case != "large but representable")  # the cases test what they say
    flat = values.clone()
    stats = me.ops.grad_stats_(flat, scale)
    torch.testing.assert_close(flat, expected_flat, rtol=0, atol=0, equal_nan=True)
    if overflows:
        assert stats.tolist() == [float("inf"), expected_count + 1]
    else:
        assert abs(stats[0] - norm64.float()) <= ulp(norm64.float()) and stats[1].item() == expected_count
    reference_stats = _ops.grad_stats_reference_(values.clone(), scale)
    assert stats[1] == reference_stats[1] and (overflows == torch.isinf(reference_stats[0]).item())
    before = flat.clone()
    me.ops.clip_(flat, stats, 1.0)
    if overflows:
        torch.testing.assert_close(flat, before, rtol=0, atol=0, equal_nan=True)
    else:
        assert abs(flat.double().norm().item() - 1.0) < 1e-5


@pytest.mark.parametrize("backend", backends_for("cpu", "clip_"))
@pytest.mark.parametrize("norm", [float("inf"), float("nan")])
def test_clip_leaves_buffer_alone_when_norm_is_not_finite(use_backend, backend, norm):
    """Even with a zero non-finite count (stats from elsewhere), a norm of inf or NaN has no meaningful
    clip factor (max_norm / inf = 0 would zero the gradient): the buffer is left untouched."""
    use_backend(backend)
    flat = make(1000, 4)
    before = flat.clone()
    me.ops.clip_(flat, torch.tensor([norm, 0.0]), 1.0)
    assert torch.equal(flat, before)


@pytest.mark.parametrize("backend", backends_for("cpu", "clip_"))
def test_clip_bad_input(use_backend, backend):
    use_backend(backend)
    flat = torch.zeros(4)
    with pytest.raises(ValueError, match="clip_: stats must be the float32 tensor \\[2\\]"):
        me.ops.clip_(flat, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="clip_: max_norm must be positive"):
        me.ops.clip_(flat, torch.zeros(2), 0.0)
    with pytest.raises(ValueError, match="clip_: flat must be contiguous"):
        me.ops.clip_(torch.zeros(4, 4).t(), torch.zeros(2), 1.0)


@pytest.mark.parametrize("op_name", ["grad_stats_", "clip_", "_triton_grad_stats_", "_triton_clip_"])
def test_opcheck(op_name):
    from memengine import triton as triton_backend

    if op_name.startswith("_triton") and triton_backend.unavailable_reason("grad_stats_", "cpu"):
        pytest.skip(f"Triton unavailable on CPU: {triton_backend.unavailable_reason('grad_stats_', 'cpu')}")
    op = getattr(torch.ops.memengine, op_name).default
    if "grad_stats" in op_name:
        for args in [(make(1000), 1.0, None), (make(1000), 0.5, None), (make(1000), 1.0, torch.tensor(0.25))]:
            torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, (make(1000), torch.tensor([100.0, 0.0]), 1.0))


def check_grad_stats_then_clip(device, sizes):
    """grad_stats_ with a device scale (one inf planted in the larger buffers), then clip_ of the
    finite buffer, on `device`: the body of the CUDA test, also run on the CPU so that it is known to work."""
    for n in sizes:
        flat = make(n, n, device) * 100
        if n > 20:
            flat[3] = float("inf")
        expected_flat, expected_norm, expected_count = oracle(flat.cpu(), 0.5)
        stats = me.ops.grad_stats_(flat, torch.tensor(0.5, device=device))
        torch.testing.assert_close(flat.cpu(), expected_flat, rtol=0, atol=0, equal_nan=True)
        assert abs(stats[0].cpu() - expected_norm) <= ulp(expected_norm)
        assert stats[1].item() == expected_count
        assert torch.equal(me.ops.grad_stats_(flat.clone()), me.ops.grad_stats_(flat.clone()))
        flat.nan_to_num_(posinf=0.0)  # undo the planted inf (small buffers have none, and no index 3)
        stats = me.ops.grad_stats_(flat)
        expected = flat.clone()
        _ops.clip_reference_(expected, stats, 1.0)
        me.ops.clip_(flat, stats, 1.0)
        assert torch.equal(flat, expected)


@pytest.mark.parametrize("backend", backends_for("cpu", "grad_stats_"))
def test_grad_stats_then_clip_with_device_scale(use_backend, backend):
    use_backend(backend)
    check_grad_stats_then_clip("cpu", SIZES)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda", "grad_stats_"))
def test_cuda_grad_stats_and_clip(use_backend, backend):
    use_backend(backend)
    check_grad_stats_then_clip("cuda", SIZES + [2**24 + 3])
