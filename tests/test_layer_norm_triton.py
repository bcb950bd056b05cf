"""The Triton layer_norm kernels (fastdl.kernels.layer_norm) against the float64 composite.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them) on CPU tensors with small blocks (rows up to 128 elements in one
block, longer ones in blocks of 32), so the sizes here reach every path: multi-row tiles, looped
rows, several programs sharing the weight-gradient sums. The checks marked ``cuda`` compare the
registered CUDA op with float64 PyTorch at realistic sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import fresh_seed, require_triton

triton = require_triton("layer_norm")

import fastdl.ops  # noqa: E402
from fastdl.kernels import layer_norm as triton_layer_norm  # noqa: E402
from fastdl.ops import _library  # noqa: E402

FORWARD = triton_layer_norm.layer_norm_forward_op
BACKWARD = triton_layer_norm.layer_norm_backward_op
COMPOSITE = _library.composite("layer_norm")
COMPOSITE_BACKWARD = _library.composite("_layer_norm_backward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ONE_BLOCK = triton_layer_norm._MAX_ONE_BLOCK

TOL = {  # outputs; the weight and bias gradients sum over rows, so they get 4x
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.fixture
def gen():
    """A generator with a fresh seed each run, printed (shown on failure)."""
    return torch.Generator().manual_seed(fresh_seed())


def make_inputs(gen, shape, normalized_shape, weight=True, bias=True, residual=False, dtype=torch.float32):
    def draw(*size, shift=0.0):
        return (torch.randn(*size, generator=gen) + shift).to(device=DEVICE, dtype=dtype)

    x = draw(*shape, shift=0.5)
    w = draw(*normalized_shape, shift=1.0) if weight else None
    b = draw(*normalized_shape) if bias else None
    r = draw(*shape) if residual else None
    return x, w, b, r


def as_double(t):
    return None if t is None else t.double()


def reference(normalized, normalized_shape, w, b, eps, grad_out, mask):
    """(out, mean, rstd, dx, dw, db) of the float64 composite for the tensor that is normalised:
    the op normalises ``x + r`` as computed in x's dtype, so that rounded sum is the input here."""
    out, _, mean, rstd = COMPOSITE(normalized.double(), normalized_shape, as_double(w), as_double(b), None, eps)
    grads = COMPOSITE_BACKWARD(grad_out.double(), normalized.double(), as_double(w), mean, rstd, normalized_shape, mask)
    return out, mean, rstd, *grads


def assert_close(actual, expected, dtype, name, scale=1):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"NaN in {name}"
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{name}: {m}")


def check(x, normalized_shape, w, b, r, eps=1e-5, mask=(True, True, True), gen=None):
    """Forward and backward of the Triton entry points against the float64 composite."""
    dtype = x.dtype
    out, residual_out, mean, rstd = FORWARD(x, normalized_shape, w, b, r, eps)
    grad_out = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=dtype)
    normalized = x if r is None else residual_out
    dx, dw, db = BACKWARD(grad_out, normalized, w, mean, rstd, normalized_shape, list(mask))
    ref_out, ref_mean, ref_rstd, ref_dx, ref_dw, ref_db = reference(
        normalized, normalized_shape, w, b, eps, grad_out, list(mask)
    )

    assert out.dtype == dtype and dx.dtype == dtype
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    assert_close(out, ref_out, dtype, "out")
    if r is None:
        assert residual_out.numel() == 0
    elif dtype == torch.bfloat16 and triton_layer_norm._INTERPRET:
        # the interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even): one ulp
        assert_close(residual_out, x + r, dtype, "residual_out")
    else:
        assert torch.equal(residual_out, x + r)  # exactly, rounded as torch rounds it
    assert_close(mean, ref_mean, torch.float32, "mean")
    assert_close(rstd, ref_rstd, torch.float32, "rstd")
    assert_close(dx, ref_dx, dtype, "grad_input", scale=2)
    for name, actual, expected in (("grad_weight", dw, ref_dw), ("grad_bias", db, ref_db)):
        assert actual.dtype == dtype, name
        if expected.numel() == 0:
            assert actual.numel() == 0, f"{name} was not asked for"
        else:
            assert_close(actual, expected, dtype, name, scale=4)
    return out, residual_out


# (input shape, normalized_shape)
SHAPES = {
    "odd-row": ((13, 33), [33]),  # 13 rows: the last 4-row tile is partial
    "row-of-one": ((5, 1), [1]),
    "one-full-block": ((6, ONE_BLOCK), [ONE_BLOCK]),
    "one-past-a-block": ((3, ONE_BLOCK + 1), [ONE_BLOCK + 1]),  # looped, last block holds one element
    "long-rows": ((4, 301), [301]),
    "two-trailing-dims": ((2, 5, 3, 11), [3, 11]),
    "many-rows": ((2, 37, 20), [20]),  # several programs share the partial sums
}


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_composite(name, residual, gen):
    shape, normalized_shape = SHAPES[name]
    x, w, b, r = make_inputs(gen, shape, normalized_shape, residual=residual)
    check(x, normalized_shape, w, b, r, gen=gen)


@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("length", [33, 150])
def test_without_weight_or_bias(weight, bias, length, gen):
    x, w, b, r = make_inputs(gen, (7, length), [length], weight=weight, bias=bias, residual=True)
    check(x, [length], w, b, r, gen=gen)


@pytest.mark.parametrize("mask", [(True, False, False), (True, True, False), (True, False, True)])
@pytest.mark.parametrize("length", [33, 150])
def test_output_mask(mask, length, gen):
    """Only the gradients asked for are computed; the others come back empty."""
    x, w, b, _ = make_inputs(gen, (9, length), [length])
    check(x, [length], w, b, None, mask=mask, gen=gen)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [33, 150])
def test_half_precision(dtype, length, gen):
    x, w, b, r = make_inputs(gen, (6, length), [length], residual=True, dtype=dtype)
    check(x, [length], w, b, r, gen=gen)


@pytest.mark.parametrize("length", [40, 200])
def test_large_mean_is_stable(length, gen):
    """float32 rows with mean 1e4 and unit spread: E[x^2] - E[x]^2 would lose every digit of the
    variance (an error near 1); the two-pass and the block-merged statistics keep it to what
    float32 inputs of that size allow (their own rounding is 1e-3)."""
    x, w, b, _ = make_inputs(gen, (5, length), [length])
    x = x + 1e4
    out, _, mean, rstd = FORWARD(x, [length], w, b, None, 1e-5)
    ref_out, ref_mean, ref_rstd, *_ = reference(x, [length], w, b, 1e-5, torch.zeros_like(x), [True, False, False])
    torch.testing.assert_close(mean.double(), ref_mean, atol=0, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), ref_rstd, atol=0, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-2, rtol=0)


@pytest.mark.parametrize("length", [20, 200])
def test_constant_rows_give_the_bias(length, gen):
    x, w, b, _ = make_inputs(gen, (3, length), [length])
    x = torch.full_like(x, 3.25)
    out, _, mean, rstd = FORWARD(x, [length], w, b, None, 1e-5)
    assert torch.equal(mean, torch.full_like(mean, 3.25))
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1e-5**-0.5))
    assert torch.equal(out, b.expand_as(out))


def test_custom_eps(gen):
    x, w, b, r = make_inputs(gen, (4, 50), [50], residual=True)
    check(x * 0.01, [50], w, b, r * 0.01, eps=0.1, gen=gen)  # eps dominates the variance


def test_non_contiguous_inputs(gen):
    x = torch.randn(33, 6, generator=gen).to(DEVICE).t()  # [6, 33] whose rows are strided
    r = torch.randn(6, 66, generator=gen).to(DEVICE)[:, ::2]
    w, b = (torch.randn(33, generator=gen).to(DEVICE) for _ in range(2))
    assert not x.is_contiguous() and not r.is_contiguous()
    out, residual_out, *_ = check(x, [33], w, b, r, gen=gen)
    assert out.shape == x.shape and residual_out.shape == x.shape


@pytest.mark.parametrize("shape", [(0, 33), (2, 0, 200)])
@pytest.mark.parametrize("residual", [False, True])
def test_empty_input(shape, residual, gen):
    length = shape[-1]
    x, w, b, r = make_inputs(gen, shape, [length], residual=residual)
    out, residual_out, mean, rstd = FORWARD(x, [length], w, b, r, 1e-5)
    assert out.shape == x.shape and mean.shape == (0,) and rstd.shape == (0,)
    assert residual_out.shape == (x.shape if residual else (0,))
    dx, dw, db = BACKWARD(torch.ones_like(x), x, w, mean, rstd, [length], [True, True, True])
    assert dx.shape == x.shape
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_partial_sums_do_not_depend_on_the_number_of_programs(monkeypatch, gen):
    """The weight gradient is the same (to rounding) whether one program or many share the rows,
    in the one-block kernel and the looped one."""
    for rows, length in ((41, 24), (11, 150)):
        x, w, b, _ = make_inputs(gen, (rows, length), [length])
        out, _, mean, rstd = FORWARD(x, [length], w, b, None, 1e-5)
        grad_out = torch.randn(x.shape, generator=gen).to(DEVICE)
        results = []
        for programs in (1, 5, 64):
            monkeypatch.setattr(triton_layer_norm, "_partial_sum_programs", lambda device, p=programs: p)
            results.append(BACKWARD(grad_out, x, w, mean, rstd, [length], [True, True, True]))
        for other in results[1:]:
            for actual, expected in zip(other, results[0]):
                torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        ref = reference(x, [length], w, b, 1e-5, grad_out, [True, True, True])
        for actual, expected in zip(results[0], ref[3:]):
            torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)


def test_matches_torch_layer_norm(gen):
    """The composite is the reference elsewhere; here the kernels meet torch itself (float64)."""
    x, w, b, _ = make_inputs(gen, (10, 70), [70])
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    expected = F.layer_norm(x64, [70], w64, b64, 1e-5)
    grad_out = torch.randn(x.shape, generator=gen).to(DEVICE)
    expected_grads = torch.autograd.grad(expected, (x64, w64, b64), grad_out.double())
    out, _, mean, rstd = FORWARD(x, [70], w, b, None, 1e-5)
    grads = BACKWARD(grad_out, x, w, mean, rstd, [70], [True, True, True])
    assert_close(out, expected, torch.float32, "out")
    for name, actual, exp in zip(("dx", "dw", "db"), grads, expected_grads):
        assert_close(actual, exp, torch.float32, name, scale=4)


def test_float64_uses_composite(gen):
    x, w, b, r = make_inputs(gen, (4, 30), [30], residual=True, dtype=torch.float64)
    result = FORWARD(x, [30], w, b, r, 1e-5)
    for actual, expected in zip(result, COMPOSITE(x, [30], w, b, r, 1e-5)):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_bad_inputs_rejected(gen):
    x, w, b, _ = make_inputs(gen, (4, 30), [30])
    with pytest.raises(RuntimeError, match=r"layer_norm: expected weight of shape \[30\]"):
        FORWARD(x, [30], w[:20], b, None, 1e-5)
    with pytest.raises(RuntimeError, match="does not match the trailing dimensions"):
        FORWARD(x, [31], None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        FORWARD(x.int(), [30], None, None, None, 1e-5)
    _, _, mean, rstd = FORWARD(x, [30], w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match=r"_layer_norm_backward: expected mean with 4 elements.*got shape \[3\]"):
        BACKWARD(torch.ones_like(x), x, w, mean[:3], rstd, [30], [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_output has shape \[4, 29\].*expected input's shape \[4, 30\]"):
        BACKWARD(torch.ones(4, 29, device=DEVICE), x, w, mean, rstd, [30], [True, True, True])


def test_block_choice():
    assert triton_layer_norm._blocks(1000, ONE_BLOCK)[1:] == (ONE_BLOCK, True)
    block_m, block_n, one_block = triton_layer_norm._blocks(1000, ONE_BLOCK + 1)
    assert block_n == triton_layer_norm._LOOP_BLOCK and not one_block
    assert block_m == max(1, triton_layer_norm._TILE_ELEMENTS // block_n)
    block_m, block_n, _ = triton_layer_norm._blocks(1000, 33)
    assert block_n == 64 and block_m * block_n <= max(triton_layer_norm._TILE_ELEMENTS, block_n)
    assert triton_layer_norm._blocks(2, 33)[0] == 2  # no tile taller than the input


# ---- GPU: the registered CUDA op at realistic sizes ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [768, 4096, 12288])  # GPT-2, a 7B model, one row in blocks
def test_cuda_op_matches_float64(dtype, width):
    assert _library.implementation("layer_norm", "cuda") == "Triton"
    assert _library.implementation("_layer_norm_backward", "cuda") == "Triton"
    gen = torch.Generator().manual_seed(width)
    shape = (4, 256, width)
    x, r = (torch.randn(shape, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(2))
    w = (1 + 0.1 * torch.randn(width, generator=gen)).to("cuda", dtype).requires_grad_()
    b = (0.1 * torch.randn(width, generator=gen)).to("cuda", dtype).requires_grad_()
    out, summed = fastdl.ops.layer_norm(x, width, w, b, residual=r)
    grad_out, grad_sum = torch.randn_like(out), torch.randn_like(summed)
    grads = torch.autograd.grad((out, summed), (x, r, w, b), (grad_out, grad_sum))

    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    x64, r64, w64, b64 = leaves
    sum64 = x64 + r64
    ref_out = F.layer_norm(sum64, [width], w64, b64, 1e-5)
    ref_grads = torch.autograd.grad((ref_out, sum64), leaves, (grad_out.double(), grad_sum.double()))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(summed.double(), sum64, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    for name, actual, expected in zip(("x", "residual", "weight", "bias"), grads, ref_grads):
        # the weight and bias gradients sum 1024 rows
        scale = 1 if name in ("x", "residual") else 20
        torch.testing.assert_close(
            actual.double(), expected, atol=tol * scale, rtol=tol * scale, msg=lambda m, n=name: f"d{n}: {m}"
        )
