"""wgrad_accumulate_: every backend (and every CPU GEMM path) against an fp64 oracle, within the
DESIGN.md tolerance: error at most 2x that of PyTorch's own fp32 result on the same inputs and device
(see torch_fp32_product)."""

import contextlib
import functools
import re
import threading
import time

import pytest
import torch
from conftest import backends_for, requires_cuda

import memengine as me
from memengine.ops import extension as _extension

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tokens, out, in): single elements, odd sizes around the 12 x 32 micro tile, > 1000 tokens.
SHAPES = [(1, 1, 1), (7, 33, 5), (33, 13, 31), (1000, 37, 70), (1031, 100, 129)]
CPU_PATHS = ["mkl", "avx512_bf16", "chunked"]


def make(shape, dtype, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@contextlib.contextmanager
def cuda_fp32_matmul_precision(precision):
    """Sets PyTorch's CUDA fp32 matmul precision (new API only, see global_matmul_precision) for the block."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def torch_fp32_product(g, x):
    """PyTorch's own float32 result of g^T x, computed on the inputs' device: the yardstick of the tolerance.

    On the CPU it is the fp32 GEMM of fp32 copies (bf16/fp16 products are exact in fp32). On CUDA it is
    what PyTorch does there: torch.mm with out_dtype=torch.float32 for bf16/fp16 (cuBLAS on tensor
    cores, fp32 accumulation; on an H200 memengine's cuBLAS call, configured alike, erred 28x more than
    the CPU's blocked fp32 sums at 4096 bf16 tokens), and the fp32 GEMM with TF32 off for fp32 inputs
    (the kernels never use TF32)."""
    if g.device.type != "cuda":
        return g.float().t() @ x.float()
    if g.dtype != torch.float32:
        return torch.mm(g.t(), x, out_dtype=torch.float32)
    with cuda_fp32_matmul_precision("ieee"):
        return g.t() @ x


def check_against_oracle(main_grad, before, grad_output, input, alpha, overwrite):
    out_features, in_features = main_grad.shape
    g = grad_output.reshape(-1, out_features)
    x = input.reshape(-1, in_features)
    torch_product = torch_fp32_product(g, x).cpu()
    main_grad, before, g, x = main_grad.cpu(), before.cpu(), g.cpu(), x.cpu()
    base = 0 if overwrite else before.double()
    oracle = float(alpha) * (g.double().t() @ x.double()) + base
    torch_result = (float(alpha) * torch_product).double() + base
    torch_error = (torch_result - oracle).abs().max() if oracle.numel() else 0
    error = (main_grad.double() - oracle).abs()
    # Twice PyTorch's largest error, plus the float32 rounding of the result.
    allowed = 2 * torch_error + oracle.abs() * 2**-23
    assert (error <= allowed).all(), (
        f"max error {error.max().item():.3g}, PyTorch's fp32 result's {float(torch_error):.3g}"
    )


@pytest.fixture
def wgrad_cpu_path(request):
    """Pins the CPU GEMM of wgrad_accumulate_ for the test, restoring 'auto' after."""
    if _extension.C is None:
        pytest.skip(f"memengine._C is not loaded ({_extension.load_error})")
    try:
        _extension.C.set_wgrad_cpu_path(request.param)
    except ValueError as error:
        pytest.skip(f"wgrad CPU path {request.param} cannot run here: {error}")
    yield request.param
    _extension.C.set_wgrad_cpu_path("auto")


def run_cases(dtype, shapes, device="cpu", around_kernel=contextlib.nullcontext):
    """Runs each case's kernel inside `around_kernel()` and checks it against the oracle outside."""
    for tokens, out_features, in_features in shapes:
        for overwrite, alpha in [(False, 0.5), (True, 1.0), (False, torch.tensor(0.25, device=device))]:
            grad_output = make((tokens, out_features), dtype, 1, device)
            input = make((tokens, in_features), dtype, 2, device)
            main_grad = make((out_features, in_features), torch.float32, 3, device)
            if overwrite:
                main_grad.fill_(float("nan"))  # must be ignored, not propagated
            before = main_grad.clone()
            with around_kernel():
                me.ops.wgrad_accumulate_(main_grad, grad_output, input, alpha=alpha, overwrite=overwrite)
            check_against_oracle(main_grad, before, grad_output, input, alpha, overwrite)


@pytest.mark.parametrize("backend", backends_for("cpu", "wgrad_accumulate_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_oracle(use_backend, backend, dtype):
    use_backend(backend)
    run_cases(dtype, SHAPES)


@pytest.mark.parametrize("wgrad_cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_each_cpu_path_matches_oracle(use_backend, wgrad_cpu_path, dtype):
    use_backend("cpp")
    run_cases(dtype, SHAPES + [(4100, 64, 48)])  # > 2048 tokens: several packed token blocks


@pytest.mark.parametrize("wgrad_cpu_path", CPU_PATHS, indirect=True)
def test_cpu_path_reported(wgrad_cpu_path):
    assert _extension.C.wgrad_cpu_path("bfloat16") == wgrad_cpu_path
    assert _extension.C.wgrad_cpu_path("float32") == "fp32_addmm"
    if wgrad_cpu_path == "avx512_bf16":  # bf16 only: fp16 inputs take the automatic choice
        assert _extension.C.wgrad_cpu_path("float16") in ("mkl", "chunked")


@contextlib.contextmanager
def user_matmul_precision(precision):
    """The user's process-wide oneDNN fp32 matmul precision while the kernel runs; the oracle's own
    fp32 matmul runs after it is restored."""
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
        assert matmul.fp32_precision == precision  # the kernel left the user's setting alone
    finally:
        matmul.fp32_precision = previous


@pytest.mark.parametrize("wgrad_cpu_path", ["chunked"], indirect=True)
@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_path_stays_exact_under_the_users_lowered_precision(use_backend, wgrad_cpu_path, precision, dtype):
    """Where the user let oneDNN round fp32 matmul operands to bf16 or tf32, operands that format does
    not hold exactly (fp16 in bf16, fp32 in both) are multiplied in fp64 chunks instead: still exact."""
    use_backend("cpp")
    run_cases(dtype, SHAPES + [(4100, 64, 48)], around_kernel=functools.partial(user_matmul_precision, precision))


def global_matmul_precision():
    """The process-wide settings that decide the precision of PyTorch's fp32 matmuls on the CPU (read
    through the new API only: torch.get_float32_matmul_precision() raises once the two APIs were mixed)."""
    return (
        torch.backends.mkldnn.matmul.fp32_precision,
        torch.backends.mkldnn.fp32_precision,
        torch.backends.fp32_precision,
    )


@pytest.mark.parametrize("wgrad_cpu_path", ["chunked"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_path_never_touches_global_matmul_precision(use_backend, wgrad_cpu_path, dtype):
    """The precision of fp32 matmuls is process-wide: a kernel that changed it, even for a moment,
    would run other threads' matmuls at the wrong precision (two concurrent calls once left it at bf16
    for good). Two threads run the kernel while this one watches the setting: it must never change."""
    use_backend("cpp")
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "none"  # the default; the old kernel set "bf16" or "ieee" while it ran
    expected = global_matmul_precision()
    g, x = make((2000, 64), dtype, 1), make((2000, 48), dtype, 2)
    stop = threading.Event()

    def run_kernel():
        while not stop.is_set():
            me.ops.wgrad_accumulate_(torch.zeros(64, 48), g, x)

    workers = [threading.Thread(target=run_kernel) for _ in range(2)]
    for worker in workers:
        worker.start()
    seen = set()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.add(global_matmul_precision())
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        after = global_matmul_precision()
        matmul.fp32_precision = previous
    assert seen == {expected}
    assert after == expected


def test_unknown_cpu_path_is_an_error():
    if _extension.C is None:
        pytest.skip(f"memengine._C is not loaded ({_extension.load_error})")
    with pytest.raises(ValueError, match="unknown wgrad CPU path 'fast'; use one of auto, mkl, avx512_bf16, chunked"):
        _extension.C.set_wgrad_cpu_path("fast")


@pytest.mark.parametrize("backend", backends_for("cpu", "wgrad_accumulate_"))
def test_3d_strided_inputs_and_sliced_main_grad(use_backend, backend):
    use_backend(backend)
    run_strided_cases(torch.bfloat16)


@pytest.mark.parametrize("wgrad_cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_each_cpu_path_with_strided_inputs(use_backend, wgrad_cpu_path, dtype):
    use_backend("cpp")
    # More tokens than the AVX512-BF16 GEMM packs at once (2048), in .t() views. (Triton's kernel sums a tile's
    # tokens in one fp32 accumulator: past about 2000 tokens it errs more than 2x torch's blocked CPU GEMM.)
    run_strided_cases(
        dtype, {"transposed, many tokens": (make((33, 2101), dtype, 1).t(), make((17, 2101), dtype, 2).t())}
    )
    if wgrad_cpu_path == "avx512_bf16" and dtype == torch.bfloat16:
        # The same packed operands as from contiguous copies: the same bits.
        g, x = make((45, 2101), dtype, 1)[:, :2099].t(), make((17, 2099), dtype, 2).t()
        from_views, from_copies = torch.zeros(45, 17), torch.zeros(45, 17)
        me.ops.wgrad_accumulate_(from_views, g, x)
        me.ops.wgrad_accumulate_(from_copies, g.contiguous(), x.contiguous())
        assert torch.equal(from_views, from_copies)


def run_strided_cases(dtype, more_cases=()):
    cases = {
        "3-D": (make((4, 25, 33), dtype, 1), make((4, 25, 17), dtype, 2)),
        "transposed": (make((33, 100), dtype, 1).t(), make((17, 100), dtype, 2).t()),
        # The CPU GEMMs read .t() views where they lie (no copy): odd token counts, padded rows, one side only.
        "transposed, odd tokens, padded rows": (make((33, 120), dtype, 1)[:, :101].t(), make((101, 17), dtype, 2)),
        "transposed input only": (make((101, 33), dtype, 1), make((17, 101), dtype, 2).t()),
        "permuted 3-D (copied)": (make((25, 4, 33), dtype, 1).transpose(0, 1), make((4, 25, 17), dtype, 2)),
        "column slices": (make((100, 70), dtype, 1)[:, 5:38], make((100, 40), dtype, 2)[:, :17]),
        **dict(more_cases),
    }
    for name, (grad_output, input) in cases.items():
        wide = make((33, 50), torch.float32, 3)
        main_grad = wide[:, 10:27]  # row-major slice: row stride 50
        before = wide.clone()
        me.ops.wgrad_accumulate_(main_grad, grad_output, input, alpha=2.0)
        check_against_oracle(main_grad, before[:, 10:27], grad_output, input, 2.0, False)
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[10:27] = False
        assert torch.equal(wide[:, untouched], before[:, untouched]), name


@pytest.mark.parametrize("backend", backends_for("cpu", "wgrad_accumulate_"))
def test_zero_tokens_and_bad_input(use_backend, backend):
    use_backend(backend)
    main_grad = torch.ones(3, 4)
    me.ops.wgrad_accumulate_(main_grad, torch.empty(0, 3), torch.empty(0, 4))
    assert torch.equal(main_grad, torch.ones(3, 4))
    me.ops.wgrad_accumulate_(main_grad, torch.empty(2, 0, 3), torch.empty(0, 4), overwrite=True)
    assert torch.equal(main_grad, torch.zeros(3, 4))
    me.ops.wgrad_accumulate_(torch.empty(0, 4), torch.empty(5, 0), torch.empty(5, 4))  # empty main_grad: no-op
    bf16 = torch.bfloat16
    g, x = torch.zeros(6, 3, dtype=bf16), torch.zeros(6, 4, dtype=bf16)
    bad = [
        ((torch.zeros(3, 4, dtype=bf16), g, x), "main_grad must be float32"),
        ((torch.zeros(12), g, x), "main_grad must be 2-D"),
        ((torch.zeros(3, 4), g.int(), x.int()), "grad_output must be float32, bfloat16 or float16"),
        ((torch.zeros(3, 4), g, x.half()), "; both must have the same dtype"),
        ((torch.zeros(3, 4), torch.zeros(6, 5, dtype=bf16), x), "grad_output's last dimension must equal"),
        ((torch.zeros(3, 4), g, torch.zeros(6, 5, dtype=bf16)), "input's last dimension must equal"),
        ((torch.zeros(3, 4), g, torch.zeros(5, 4, dtype=bf16)), "must hold the same number of tokens"),
        ((torch.zeros(3, 4), g, x.to("meta")), "input is on meta but main_grad is on cpu"),
        ((torch.zeros(4, 3).t(), g, x), "main_grad must be a row-major matrix"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=f"wgrad_accumulate_: .*{re.escape(message)}"):
            me.ops.wgrad_accumulate_(*args)
    buffer = torch.zeros(40)
    with pytest.raises(ValueError, match="main_grad and input overlap in memory"):
        me.ops.wgrad_accumulate_(buffer[:12].view(3, 4), torch.zeros(6, 3), buffer[10:34].view(6, 4))
    with pytest.raises(ValueError, match="alpha must be a Python float or a 0-dim float32 tensor"):
        me.ops.wgrad_accumulate_(torch.zeros(3, 4), g, x, alpha=torch.ones(2))


@pytest.mark.parametrize("op_name", ["wgrad_accumulate_", "_triton_wgrad_accumulate_"])
def test_opcheck(op_name):
    from memengine import triton as triton_backend

    reason = triton_backend.unavailable_reason("wgrad_accumulate_", "cpu")
    if op_name.startswith("_triton") and reason:
        pytest.skip(f"Triton unavailable on CPU: {reason}")
    op = getattr(torch.ops.memengine, op_name).default
    for dtype in DTYPES:
        for alpha, alpha_tensor, overwrite in [(1.0, None, False), (0.5, None, True), (1.0, torch.tensor(2.0), False)]:
            args = (make((9, 5), torch.float32), make((3, 11, 9), dtype, 1), make((33, 5), dtype, 2))
            torch.library.opcheck(op, args + (alpha, alpha_tensor, overwrite))


def test_compiles_in_a_graph():
    def step(main_grad, grad_output, input):
        me.ops.wgrad_accumulate_(main_grad, grad_output * 2, input)
        return main_grad.sum()

    main_grad = torch.zeros(8, 6)
    g, x = make((20, 8), torch.bfloat16, 1), make((20, 6), torch.bfloat16, 2)
    expected = torch.zeros(8, 6)
    step(expected, g, x)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    compiled(main_grad, g, x)
    assert torch.equal(main_grad, expected)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda", "wgrad_accumulate_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_oracle(use_backend, backend, dtype):
    use_backend(backend)
    run_cases(dtype, SHAPES + [(4096, 1024, 512)], device="cuda")
