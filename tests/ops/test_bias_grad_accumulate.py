"""bias_grad_accumulate_: every backend against an fp64 oracle, within the DESIGN.md tolerance
(error at most 2x what PyTorch's own float32 `g.float().sum(0)` makes on the same input)."""

import pytest
import torch
from conftest import backends_for, requires_cuda

import memengine as me

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 5), (7, 33), (33, 1), (1000, 17), (4, 300, 65), (1500, 129)]


def make(shape, dtype, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def check_against_oracle(main_grad, before, grad_output, alpha, overwrite):
    out = main_grad.shape[0]
    sums64 = grad_output.reshape(-1, out).double().sum(0)
    oracle = float(alpha) * sums64 + (0 if overwrite else before.double())
    torch_sums = grad_output.reshape(-1, out).float().sum(0).double()
    torch_error = (float(alpha) * torch_sums + (0 if overwrite else before.double()) - oracle).abs()
    error = (main_grad.double() - oracle).abs()
    # At most twice torch's largest error, plus the one float32 rounding of the result.
    allowed = 2 * torch_error.max() + oracle.abs() * 2**-23
    assert (error <= allowed).all(), f"max error {error.max().item():.3g}, torch's {torch_error.max().item():.3g}"


@pytest.mark.parametrize("backend", backends_for("cpu", "bias_grad_accumulate_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_matches_oracle(use_backend, backend, dtype, shape, overwrite):
    use_backend(backend)
    grad_output = make(shape, dtype, 1)
    main_grad = make(shape[-1:], torch.float32, 2)
    before = main_grad.clone()
    me.ops.bias_grad_accumulate_(main_grad, grad_output, alpha=0.5, overwrite=overwrite)
    check_against_oracle(main_grad, before, grad_output, 0.5, overwrite)


@pytest.mark.parametrize("backend", backends_for("cpu", "bias_grad_accumulate_"))
def test_strided_inputs_tensor_alpha_and_determinism(use_backend, backend):
    use_backend(backend)
    base = make((600, 2, 70), torch.bfloat16, 3)
    cases = {"transposed": make((70, 600), torch.bfloat16, 4).t(), "sliced": base[:, 0, :], "3-D view": base[:, :, :]}
    for name, grad_output in cases.items():
        out = grad_output.shape[-1]
        main_grad = torch.zeros(out)
        me.ops.bias_grad_accumulate_(main_grad, grad_output, alpha=torch.tensor(0.25))
        check_against_oracle(main_grad, torch.zeros(out), grad_output, 0.25, False)
        again = torch.zeros(out)
        me.ops.bias_grad_accumulate_(again, grad_output, alpha=torch.tensor(0.25))
        assert torch.equal(main_grad, again), name
    strided_main_grad = torch.zeros(140)[::2]
    me.ops.bias_grad_accumulate_(strided_main_grad, base[:, 1, :])
    check_against_oracle(strided_main_grad, torch.zeros(70), base[:, 1, :], 1.0, False)


@pytest.mark.parametrize("backend", backends_for("cpu", "bias_grad_accumulate_"))
def test_zero_rows_and_bad_input(use_backend, backend):
    use_backend(backend)
    main_grad = torch.ones(5)
    me.ops.bias_grad_accumulate_(main_grad, torch.empty(0, 5))
    assert main_grad.tolist() == [1.0] * 5
    me.ops.bias_grad_accumulate_(main_grad, torch.empty(0, 5), overwrite=True)
    assert main_grad.tolist() == [0.0] * 5
    bad = [
        (torch.zeros(5, dtype=torch.bfloat16), torch.zeros(3, 5), "main_grad must be float32"),
        (torch.zeros(5, 1), torch.zeros(3, 5), "main_grad must be 1-D"),
        (torch.zeros(5), torch.zeros(3, 5, dtype=torch.int32), "grad_output must be float32, bfloat16 or float16"),
        (torch.zeros(5), torch.zeros(3, 4), "grad_output's last dimension must equal main_grad's size 5"),
        (torch.zeros(5), torch.zeros(3, 5, device="meta"), "grad_output is on meta but main_grad is on cpu"),
    ]
    for main_grad, grad_output, message in bad:
        with pytest.raises(ValueError, match=f"bias_grad_accumulate_: {message}"):
            me.ops.bias_grad_accumulate_(main_grad, grad_output)
    buffer = torch.zeros(20)
    with pytest.raises(ValueError, match="main_grad and grad_output overlap in memory"):
        me.ops.bias_grad_accumulate_(buffer[:5], buffer[3:18].view(3, 5))


@pytest.mark.parametrize("backend", backends_for("cpu", "bias_grad_accumulate_"))
@pytest.mark.parametrize("overwrite", [False, True], ids=["accumulate", "overwrite"])
def test_main_grad_with_internal_overlap_is_rejected(use_backend, backend, overwrite):
    """An expand()ed main_grad maps many outputs to one element: the sums would race (CUDA) or
    silently come out wrong (C++). Every backend rejects it like accumulate_ does its dst."""
    use_backend(backend)
    main_grad = torch.zeros(1).expand(5)
    with pytest.raises(
        ValueError,
        match=r"bias_grad_accumulate_: main_grad has elements that share memory .*main_grad\.contiguous\(\)",
    ):
        me.ops.bias_grad_accumulate_(main_grad, torch.ones(3, 5), overwrite=overwrite)
    assert main_grad.tolist() == [0.0] * 5


@pytest.mark.parametrize("op_name", ["bias_grad_accumulate_", "_triton_bias_grad_accumulate_"])
def test_opcheck(op_name):
    from memengine import triton as triton_backend

    reason = triton_backend.unavailable_reason("bias_grad_accumulate_", "cpu")
    if op_name.startswith("_triton") and reason:
        pytest.skip(f"Triton unavailable on CPU: {reason}")
    op = getattr(torch.ops.memengine, op_name).default
    for dtype in DTYPES:
        for alpha, alpha_tensor, overwrite in [(1.0, None, False), (0.5, None, True), (1.0, torch.tensor(2.0), False)]:
            torch.library.opcheck(
                op, (make((9,), torch.float32), make((3, 11, 9), dtype, 1), alpha, alpha_tensor, overwrite)
            )


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for("cuda", "bias_grad_accumulate_"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_oracle(use_backend, backend, dtype):
    use_backend(backend)
    for shape in SHAPES + [(16384, 4096)]:
        grad_output = make(shape, dtype, 1, "cuda")
        main_grad = make(shape[-1:], torch.float32, 2, "cuda")
        before = main_grad.clone()
        me.ops.bias_grad_accumulate_(main_grad, grad_output, alpha=torch.tensor(0.5, device="cuda"))
        check_against_oracle(main_grad.cpu(), before.cpu(), grad_output.cpu(), 0.5, False)
        again = before.clone()
        me.ops.bias_grad_accumulate_(again, grad_output, alpha=0.5)
        assert torch.equal(main_grad, again)
