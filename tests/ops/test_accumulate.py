"""accumulate_ / multi_accumulate_: every backend against the reference and an fp64 oracle."""

import pytest
import torch
from conftest import backends_for, cpu_isas, requires_cuda

import memengine as me

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd sizes straddle the SIMD widths (8, 16), the 4x-unrolled loop (64) and the thread grain (32768).
SHAPES = [(1,), (7,), (15,), (16,), (17,), (33,), (65,), (1000,), (65537,), (3, 5, 7), (4, 1, 129)]


def make(shape, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def ulp(x):
    """Spacing of float32 numbers at x."""
    x = x.abs().to(torch.float32)
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def exact(dst, src, alpha, overwrite):
    """The exact result, rounded once to float32 (alpha as the float32 the kernels see)."""
    alpha64 = float(torch.tensor(float(alpha), dtype=torch.float32))
    value = alpha64 * src.double() + (0 if overwrite else dst.double())
    return value.to(torch.float32)


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_alpha_one_is_bit_exact(use_backend, backend, dtype, shape, overwrite):
    use_backend(backend)
    dst, src = make(shape, torch.float32, 1), make(shape, dtype, 2)
    expected = src.float().clone() if overwrite else dst.clone().add_(src)
    me.ops.accumulate_(dst, src, overwrite=overwrite)
    assert torch.equal(dst, expected)


def unfused(dst, src, alpha, overwrite):
    """float32(float32(alpha * src) + dst): a multiply and an add, each rounded."""
    product = torch.tensor(float(alpha), dtype=torch.float32) * src.float()
    return product if overwrite else product + dst


def allowed_error(backend, expected, src, alpha):
    """How far from `expected` (the exact result rounded once) a backend may land. The compiled
    and Triton kernels round dst + alpha*src once. The reference rounds twice when alpha is a
    tensor (float32(alpha*src), then add_), so its bound adds one rounding of the product."""
    bound = ulp(expected)
    if backend == "torch":
        bound = bound + ulp(src.float() * float(alpha))
    return bound


def expected_rounding(backend):
    """How a backend rounds dst + alpha*src. The compiled kernels fuse it (one rounding). Triton
    fuses it on a GPU, but its CPU interpreter evaluates tl.fma as a multiply and an add."""
    if backend == "triton" and not torch.cuda.is_available():
        return unfused
    return exact


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_scaled_results_are_rounded_as_specified(use_backend, backend, dtype, alpha_kind, overwrite):
    use_backend(backend)
    dst, src = make((4099,), torch.float32, 3), make((4099,), dtype, 4)
    dst[::4] = -(src[::4].double() * 0.1).float()  # near-total cancellation, where the rounding shows
    alpha = 0.1 if alpha_kind == "float" else torch.tensor(0.1)
    oracle = exact(dst, src, alpha, overwrite)
    if backend == "torch":
        expected = None  # the reference may round once or twice: bound its error instead
    else:
        expected = expected_rounding(backend)(dst, src, alpha, overwrite)
    me.ops.accumulate_(dst, src, alpha=alpha, overwrite=overwrite)
    if expected is None:
        assert ((dst - oracle).abs() <= allowed_error(backend, oracle, src, 0.1)).all()
    else:
        assert torch.equal(dst, expected)


@pytest.mark.parametrize("cpu_isa", cpu_isas(), indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_every_cpu_isa_is_correctly_rounded(use_backend, cpu_isa, dtype, overwrite):
    use_backend("cpp")
    for n in (1, 15, 16, 17, 63, 64, 65, 130, 100003):
        dst, src = make((n,), torch.float32, n), make((n,), dtype, n + 1)
        oracle = exact(dst, src, 0.37, overwrite)
        me.ops.accumulate_(dst, src, alpha=0.37, overwrite=overwrite)
        # One fused multiply-add rounds once: the result is the exactly rounded value.
        assert torch.equal(dst, oracle), f"n={n}"


def strided_pairs(dtype):
    base = make((64, 130), torch.float32, 5)
    yield "transposed", base.t(), make((130, 64), dtype, 6)
    yield "every-other-column", base[:, ::2], make((64, 65), dtype, 7)
    yield "src-transposed", make((40, 50), torch.float32, 8), make((50, 40), dtype, 9).t()
    yield "src-broadcast", make((30, 70), torch.float32, 10), make((70,), dtype, 11).expand(30, 70)
    yield (
        "channels-last",
        make((2, 8, 5, 7), torch.float32, 12).to(memory_format=torch.channels_last),
        make((2, 8, 5, 7), dtype, 13),
    )
    yield "offset-view", make((1001,), torch.float32, 14)[1:], make((1001,), dtype, 15)[:-1]


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_strided_tensors(use_backend, backend, dtype, overwrite):
    use_backend(backend)
    for name, dst, src in strided_pairs(dtype):
        storage_before = dst.untyped_storage().data_ptr()
        whole = dst._base.clone() if dst._base is not None else None
        expected = exact(dst, src, 0.5, overwrite)
        me.ops.accumulate_(dst, src, alpha=0.5, overwrite=overwrite)
        assert torch.equal(dst, expected), name
        assert dst.untyped_storage().data_ptr() == storage_before, name
        if whole is not None:  # elements outside the view are untouched
            untouched = torch.ones_like(whole, dtype=torch.bool)
            untouched.view(-1)[
                torch.arange(whole.numel()).view_as(whole).as_strided(dst.shape, dst.stride(), dst.storage_offset())
            ] = False
            assert torch.equal(dst._base[untouched], whole[untouched]), name


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_zero_size_is_a_no_op(use_backend, backend):
    use_backend(backend)
    for shape in [(0,), (3, 0), (0, 5, 2)]:
        dst, src = torch.empty(shape), torch.empty(shape, dtype=torch.bfloat16)
        me.ops.accumulate_(dst, src, alpha=2.0)
        me.ops.accumulate_(dst, src, overwrite=True)
    me.ops.multi_accumulate_([], [])
    dst = make((5,), torch.float32)
    expected = dst.clone().add_(1.0)
    me.ops.multi_accumulate_([torch.empty(0), dst], [torch.empty(0, dtype=torch.float16), torch.ones(5)])
    assert torch.equal(dst, expected)


@pytest.mark.parametrize("backend", backends_for("cpu", "multi_accumulate_"))
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_multi_matches_per_pair(use_backend, backend, alpha_kind, overwrite):
    use_backend(backend)
    shapes = [(3,), (1000,), (17, 33), (0,), (65537,), (8, 4, 2)] * 9  # more tensors than one CUDA launch takes
    dsts = [make(shape, torch.float32, i) for i, shape in enumerate(shapes)]
    srcs = [make(shape, DTYPES[i % 3], 100 + i) for i, shape in enumerate(shapes)]
    srcs[1] = make((2000,), torch.bfloat16, 7)[::2]  # one strided source
    alpha = 0.75 if alpha_kind == "float" else torch.tensor(0.75)
    expected = [exact(d, s, 0.75, overwrite) for d, s in zip(dsts, srcs, strict=True)]
    me.ops.multi_accumulate_(dsts, srcs, alpha=alpha, overwrite=overwrite)
    for i, (got, want) in enumerate(zip(dsts, expected, strict=True)):
        assert ((got - want).abs() <= ulp(want)).all(), f"pair {i}"


BAD_CALLS = {
    "dst-not-fp32": (lambda: (torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4)), "dst must be float32"),
    "dst-integer": (lambda: (torch.zeros(4, dtype=torch.int32), torch.zeros(4)), "dst must be float32"),
    "src-integer": (lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.int64)), "src must be float32, bfloat16"),
    "src-complex": (lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.complex64)), "src must be float32, bfloat16"),
    "src-float64": (lambda: (torch.zeros(4), torch.zeros(4, dtype=torch.float64)), "src must be float32, bfloat16"),
    "shape": (lambda: (torch.zeros(4, 3), torch.zeros(3, 4)), "src has shape \\[3, 4\\] but dst has shape \\[4, 3\\]"),
    "broadcast": (lambda: (torch.zeros(4, 3), torch.zeros(3)), "src has shape \\[3\\] .*no broadcasting"),
    "device": (lambda: (torch.zeros(4), torch.zeros(4, device="meta")), "src is on meta but dst is on cpu"),
}


def overlapping_pair():
    buffer = torch.zeros(20)
    return buffer[:10], buffer[5:15]


def reinterpreted_pair():
    buffer = torch.zeros(8)
    return buffer, buffer.view(torch.bfloat16)[:8]


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_rejected_by_name(use_backend, backend, case):
    use_backend(backend)
    make_args, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=f"accumulate_: {message}"):
        me.ops.accumulate_(*make_args())


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_memory_overlap_is_rejected(use_backend, backend):
    use_backend(backend)
    for dst, src in (overlapping_pair(), reinterpreted_pair()):
        with pytest.raises(ValueError, match="dst and src overlap in memory"):
            me.ops.accumulate_(dst, src)
    with pytest.raises(ValueError, match="dst has elements that share memory"):
        me.ops.accumulate_(torch.zeros(1).expand(4), torch.zeros(4))
    # The same tensor as dst and src is well defined element by element: dst <- dst + alpha*dst.
    x = make((100,), torch.float32)
    expected = x * 3
    me.ops.accumulate_(x, x, alpha=2.0)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_bad_alpha_is_rejected(use_backend, backend):
    use_backend(backend)
    dst, src = torch.zeros(4), torch.zeros(4)
    with pytest.raises(ValueError, match="alpha must be a Python float or a 0-dim float32 tensor"):
        me.ops.accumulate_(dst, src, alpha=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="alpha must be a Python float or a 0-dim float32 tensor"):
        me.ops.accumulate_(dst, src, alpha=torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("backend", backends_for("cpu", "multi_accumulate_"))
def test_multi_bad_input_is_rejected_by_name(use_backend, backend):
    use_backend(backend)
    with pytest.raises(ValueError, match="dsts has 2 tensors but srcs has 1"):
        me.ops.multi_accumulate_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])
    with pytest.raises(ValueError, match=r"srcs\[1\] must be float32, bfloat16 or float16, got (torch.int32|Int)"):
        me.ops.multi_accumulate_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2), torch.zeros(2, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"dsts\[1\] must be float32"):
        me.ops.multi_accumulate_([torch.zeros(2), torch.zeros(2).half()], [torch.zeros(2), torch.zeros(2)])
    buffer = torch.zeros(10)
    with pytest.raises(ValueError, match=r"dsts\[0\] and dsts\[1\] overlap in memory"):
        me.ops.multi_accumulate_([buffer[:6], buffer[4:]], [torch.zeros(6), torch.zeros(6)])
    with pytest.raises(ValueError, match=r"srcs\[0\] overlaps dsts\[1\] in memory"):
        me.ops.multi_accumulate_([torch.zeros(4), buffer[:5]], [buffer[3:7], torch.zeros(5)])
    # A pair may still use the same tensor as dst and src.
    same = torch.ones(3)
    me.ops.multi_accumulate_([same, torch.zeros(2)], [same, torch.ones(2)])
    assert same.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "op_name", ["accumulate_", "multi_accumulate_", "_triton_accumulate_", "_triton_multi_accumulate_"]
)
def test_opcheck(op_name):
    from memengine import triton as triton_backend

    if op_name.startswith("_triton") and triton_backend.unavailable_reason("accumulate_", "cpu"):
        pytest.skip(f"Triton unavailable on CPU: {triton_backend.unavailable_reason('accumulate_', 'cpu')}")
    op = getattr(torch.ops.memengine, op_name).default
    single = "multi" not in op_name
    for dtype in DTYPES:
        for alpha, alpha_tensor, overwrite in [(1.0, None, False), (0.5, None, True), (1.0, torch.tensor(0.25), False)]:
            if single:
                args = (make((37, 3), torch.float32), make((37, 3), dtype, 1), alpha, alpha_tensor, overwrite)
            else:
                args = (
                    [make((5,), torch.float32), make((6, 2), torch.float32)],
                    [make((5,), dtype, 1), make((6, 2), dtype, 2)],
                    alpha,
                    alpha_tensor,
                    overwrite,
                )
            torch.library.opcheck(op, args)


def test_torch_compile_traces_the_op():
    def step(dst, src, scale):
        me.ops.accumulate_(dst, src, alpha=scale)
        return dst.sum()

    compiled = torch.compile(step, fullgraph=True)
    dst, src = make((300,), torch.float32), make((300,), torch.bfloat16, 1)
    expected_dst = dst.clone().add_(src, alpha=0.5)
    compiled(dst, src, torch.tensor(0.5))
    assert torch.allclose(dst, expected_dst, rtol=0, atol=1e-6)


def _gib_available():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    except (OSError, StopIteration):
        return 0.0


@pytest.mark.large
@pytest.mark.skipif(_gib_available() < 16, reason="needs 16 GiB of free memory for 2**31 + 99 elements")
def test_more_than_two_to_the_31_elements(use_backend):
    use_backend("cpp" if me.ops.extension.C is not None else "torch")
    n = 2**31 + 99
    dst = torch.zeros(n)
    src = torch.ones(n, dtype=torch.bfloat16)
    src[-1] = 3.0
    me.ops.accumulate_(dst, src, alpha=2.0)
    del src
    assert dst[-1].item() == 6.0 and dst[2**31 - 1 : 2**31 + 2].eq(2.0).all()
    assert dst[:-1].eq(2.0).all()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_cuda_matches_oracle(use_backend, backend, dtype, overwrite):
    use_backend(backend)
    for shape in SHAPES + [(2**22 + 3,)]:
        dst, src = make(shape, torch.float32, 1, "cuda"), make(shape, dtype, 2, "cuda")
        for alpha in (1.0, 0.3, torch.tensor(0.3, device="cuda")):
            expected = exact(dst, src, alpha, overwrite)
            me.ops.accumulate_(dst, src, alpha=alpha, overwrite=overwrite)
            assert ((dst - expected).abs() <= allowed_error(backend, expected, src, alpha)).all(), (shape, alpha)
            dst = expected.clone()
    # Misaligned pointers take the one-element path.
    dst, src = make((1001,), torch.float32, 3, "cuda")[1:], make((1001,), dtype, 4, "cuda")[1:]
    expected = exact(dst, src, 1.0, overwrite)
    me.ops.accumulate_(dst, src, overwrite=overwrite)
    assert torch.equal(dst, expected)
    for name, dst, src in strided_pairs(dtype):
        dst, src = dst.cuda(), src.cuda()
        expected = exact(dst, src, 0.5, overwrite)
        me.ops.accumulate_(dst, src, alpha=0.5, overwrite=overwrite)
        assert torch.equal(dst, expected), name


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda", "multi_accumulate_"))
def test_cuda_multi_and_device_mismatch(use_backend, backend):
    use_backend(backend)
    shapes = [(3,), (70000,), (17, 33), (0,), (2**17 + 1,)] * 20
    dsts = [make(s, torch.float32, i, "cuda") for i, s in enumerate(shapes)]
    srcs = [make(s, DTYPES[i % 3], 500 + i, "cuda") for i, s in enumerate(shapes)]
    expected = [exact(d, s, 0.5, False) for d, s in zip(dsts, srcs, strict=True)]
    me.ops.multi_accumulate_(dsts, srcs, alpha=torch.tensor(0.5, device="cuda"))
    for got, want in zip(dsts, expected, strict=True):
        assert ((got - want).abs() <= ulp(want)).all()
    with pytest.raises(ValueError, match="src is on cpu but dst is on cuda"):
        me.ops.accumulate_(torch.zeros(4, device="cuda"), torch.zeros(4))
