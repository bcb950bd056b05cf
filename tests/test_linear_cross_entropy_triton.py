"""The Triton linear_cross_entropy kernel (fastdl.kernels.linear_cross_entropy) against the float64
composite.

Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports it) on CPU tensors, with vocabulary blocks of 32 and chunks of at most 256
logits, so small shapes already walk several blocks per row and several chunks. The checks marked
``cuda`` compare the registered CUDA op with the float64 composite at GPT-2's sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import fresh_seed, require_triton

triton = require_triton("linear_cross_entropy")

import fastdl.ops  # noqa: E402
from fastdl.kernels import linear_cross_entropy as triton_lce  # noqa: E402
from fastdl.ops import _library  # noqa: E402

FORWARD = triton_lce.linear_cross_entropy_forward_op
BACKWARD = triton_lce.linear_cross_entropy_backward_op
COMPOSITE = _library.composite("linear_cross_entropy")
COMPOSITE_BACKWARD = _library.composite("_linear_cross_entropy_backward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ["mean", "sum", "none"]

TOL = {  # 16-bit logits are rounded to their dtype before the softmax (as F.linear's are)
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


@pytest.fixture
def gen():
    """A generator with a fresh seed each run, printed (shown on failure)."""
    return torch.Generator().manual_seed(fresh_seed())


def make_inputs(gen, n, e, v, bias=True, ignored_every=4, ignore_index=-100, dtype=torch.float32, scale=1.0):
    hidden = torch.randn(n, e, generator=gen) * scale
    weight = torch.randn(v, e, generator=gen) / e**0.5
    b = torch.randn(v, generator=gen) if bias else None
    target = torch.randint(0, v, (n,), generator=gen)
    if ignored_every:
        target[::ignored_every] = ignore_index
    cast = [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in (hidden, weight, b)]
    return *cast, target.to(DEVICE)


def as_double(t):
    return None if t is None else t.double()


def assert_close(actual, expected, dtype, name, scale=1):
    """Within the dtype's tolerance, relative to the largest finite expected magnitude: gradients
    of a mean over many classes are tiny, and an absolute tolerance would not check them."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]
    unit = finite.abs().max().item() if finite.numel() and finite.abs().max() > 0 else 1.0
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(
        actual.double() / unit,
        expected.double() / unit,
        **tol,
        equal_nan=True,
        msg=lambda m: f"{name} (divided by {unit:.3g}): {m}",
    )


def grad_loss_for(gen, n, reduction):
    return torch.randn(n, generator=gen) if reduction == "none" else torch.tensor(0.75)


def check(hidden, weight, target, bias, reduction, ignore_index=-100, gen=None):
    """Forward (with the gradients it computes for a scalar loss) and the recomputing backward,
    against the float64 composite; returns the forward's outputs."""
    dtype = hidden.dtype
    h64, w64, b64 = hidden.double(), weight.double(), as_double(bias)
    compute_grad = reduction != "none"
    out = FORWARD(hidden, weight, target, bias, ignore_index, reduction, compute_grad)
    ref = COMPOSITE(h64, w64, target, b64, ignore_index, reduction, compute_grad)
    loss, lse = out[:2]
    assert loss.dtype == dtype and lse.dtype == torch.float32
    assert_close(loss, ref[0], dtype, "loss", scale=2)
    assert_close(lse, ref[1], dtype, "lse")
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for name, actual, expected in zip(names, out[2:], ref[2:]):
        assert actual.dtype == dtype, name
        assert_close(actual, expected, dtype, name)

    grad_loss = grad_loss_for(gen, hidden.size(0), reduction).to(hidden.device)
    grads = BACKWARD(grad_loss.to(dtype), hidden, weight, target, bias, lse, ignore_index, reduction)
    ref_grads = COMPOSITE_BACKWARD(grad_loss.double(), h64, w64, target, b64, ref[1], ignore_index, reduction)
    for name, actual, expected in zip(names, grads, ref_grads):
        assert actual.dtype == dtype, name
        assert_close(actual, expected, dtype, f"backward {name}")
    return out


# (N, E, V): V not a power of two, rows spread over several chunks and vocabulary blocks
SHAPES = {
    "small-vocab": (9, 8, 5),  # one block, one chunk
    "two-blocks": (20, 16, 37),  # 4 chunks of 5 rows; the last block holds 5 classes
    "many-blocks": (13, 12, 100),  # 7 chunks of 2 rows, the last of 1
    "one-row-chunks": (5, 8, 300),  # more logits per row than the chunk budget
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_composite(name, reduction, gen):
    n, e, v = SHAPES[name]
    hidden, weight, bias, target = make_inputs(gen, n, e, v)
    check(hidden, weight, target, bias, reduction, gen=gen)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_bias(reduction, gen):
    hidden, weight, _, target = make_inputs(gen, 11, 8, 37, bias=False)
    out = check(hidden, weight, target, None, reduction, gen=gen)
    if reduction != "none":
        assert out[4].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(dtype, reduction, gen):
    hidden, weight, bias, target = make_inputs(gen, 12, 16, 70, dtype=dtype)
    check(hidden, weight, target, bias, reduction, gen=gen)


def test_custom_ignore_index(gen):
    """An ignore_index inside [0, V): rows of that class are the ignored ones."""
    hidden, weight, bias, target = make_inputs(gen, 16, 8, 37, ignored_every=0)
    target[:5] = 3
    out = check(hidden, weight, target, bias, "none", ignore_index=3, gen=gen)
    assert torch.equal(out[0] == 0, target == 3)


def test_no_rows_ignored(gen):
    hidden, weight, bias, target = make_inputs(gen, 10, 8, 37, ignored_every=0)
    check(hidden, weight, target, bias, "mean", gen=gen)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction, gen):
    """As F.cross_entropy: a NaN mean (0 / 0), a zero sum, zero per-row losses, zero gradients."""
    hidden, weight, bias, target = make_inputs(gen, 6, 8, 37, ignored_every=1)
    loss, lse, *grads = FORWARD(hidden, weight, target, bias, -100, reduction, reduction != "none")
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert loss.isnan().all() if reduction == "mean" else (loss == 0).all()
    if reduction == "none":
        grads = BACKWARD(torch.ones(6, device=DEVICE), hidden, weight, target, bias, lse, -100, reduction)
    for grad, source in zip(grads, (hidden, weight, bias)):
        assert grad.shape == source.shape and (grad == 0).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(reduction, gen):
    hidden, weight, bias, target = make_inputs(gen, 0, 8, 37)
    loss, lse, *grads = FORWARD(hidden, weight, target, bias, -100, reduction, reduction != "none")
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert lse.shape == (0,)
    if reduction == "none":
        grads = BACKWARD(torch.ones(0, device=DEVICE), hidden, weight, target, bias, lse, -100, reduction)
    for grad, source in zip(grads, (hidden, weight, bias)):
        assert grad.shape == source.shape and (grad == 0).all()


def test_no_gradients_when_not_asked(gen):
    hidden, weight, bias, target = make_inputs(gen, 10, 8, 37)
    loss, lse, *grads = FORWARD(hidden, weight, target, bias, -100, "sum", False)
    assert all(g.numel() == 0 for g in grads)
    ref = COMPOSITE(hidden.double(), weight.double(), target, bias.double(), -100, "sum", False)
    assert_close(loss, ref[0], torch.float32, "loss")
    assert_close(lse, ref[1], torch.float32, "lse")


def test_large_logits_are_stable(gen):
    """Logits in the hundreds: exp would overflow without the running max."""
    hidden, weight, bias, target = make_inputs(gen, 10, 16, 100, scale=60.0)
    logits = F.linear(hidden.double(), weight.double(), bias.double())
    assert logits.abs().max() > 100
    check(hidden, weight, target, bias, "sum", gen=gen)


def test_masked_classes(gen):
    """A -inf bias hides classes, a whole first vocabulary block of them included: those get no
    probability and no gradient, and the log-sum-exp runs over the others."""
    hidden, weight, bias, target = make_inputs(gen, 10, 8, 70)
    hidden_classes = torch.arange(70, device=DEVICE) < 32
    hidden_classes[50] = True
    bias = bias.masked_fill(hidden_classes, float("-inf"))
    target[1:] = torch.randint(32, 50, (9,), generator=gen).to(DEVICE)
    out = check(hidden, weight, target, bias, "mean", gen=gen)
    assert torch.isfinite(out[0])
    assert (out[3][hidden_classes] == 0).all() and (out[4][hidden_classes] == 0).all()


def test_non_contiguous_inputs(gen):
    hidden, weight, bias, target = make_inputs(gen, 12, 8, 37)
    hidden_t = hidden.t().contiguous().t()
    weight_strided = torch.stack([weight, torch.zeros_like(weight)], dim=-1)[..., 0]
    target_strided = torch.stack([target, target], dim=-1)[:, 0]
    assert not hidden_t.is_contiguous() and not weight_strided.is_contiguous() and not target_strided.is_contiguous()
    out = FORWARD(hidden_t, weight_strided, target_strided, bias, -100, "mean", True)
    ref = COMPOSITE(hidden.double(), weight.double(), target, bias.double(), -100, "mean", True)
    for name, actual, expected in zip(("loss", "lse", "dh", "dw", "db"), out, ref):
        assert_close(actual, expected, torch.float32, name)
        assert actual.is_contiguous(), name


def test_matches_torch_cross_entropy(gen):
    """The composite is the reference elsewhere; here the kernel meets F.cross_entropy itself."""
    hidden, weight, bias, target = make_inputs(gen, 14, 8, 37)
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    expected = F.cross_entropy(F.linear(*leaves), target)
    expected_grads = torch.autograd.grad(expected, leaves)
    loss, _, *grads = FORWARD(hidden, weight, target, bias, -100, "mean", True)
    assert_close(loss, expected, torch.float32, "loss")
    for name, actual, exp in zip(("dh", "dw", "db"), grads, expected_grads):
        assert_close(actual, exp, torch.float32, name)


def test_chunks_do_not_change_the_result(monkeypatch, gen):
    """One chunk or one row per chunk: the same losses and gradients (to rounding)."""
    hidden, weight, bias, target = make_inputs(gen, 10, 8, 37)
    results = []
    for budget in (1, 37 * 3, 10**6):
        monkeypatch.setattr(triton_lce, "_CHUNK_LOGITS", budget)
        results.append(FORWARD(hidden, weight, target, bias, -100, "sum", True))
    for other in results[1:]:
        for actual, expected in zip(other, results[0]):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_chunk_rows():
    budget = 1 << 23
    assert triton_lce.chunk_rows(1024, 50257, budget) == 147  # 7 chunks, each at most 2**23 logits
    for n, v in ((1, 10), (1000, 10), (1000, 50257), (333, 100000), (5, budget * 2), (0, 7)):
        rows = triton_lce.chunk_rows(n, v, budget)
        chunks = triton.cdiv(n, rows)
        assert rows >= 1 and (rows == 1 or rows * v <= budget), (n, v)
        # as few chunks as the budget allows, and no chunk far shorter than the others
        assert chunks == triton.cdiv(n, max(1, min(n, budget // v))) or n == 0, (n, v)
        assert n == 0 or n - (chunks - 1) * rows > rows - chunks, (n, v)


def test_float64_uses_composite(gen):
    hidden, weight, bias, target = make_inputs(gen, 9, 8, 37, dtype=torch.float64)
    out = FORWARD(hidden, weight, target, bias, -100, "mean", True)
    for actual, expected in zip(out, COMPOSITE(hidden, weight, target, bias, -100, "mean", True)):
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)


def test_bad_inputs_rejected(gen):
    hidden, weight, bias, target = make_inputs(gen, 6, 8, 37)
    bad = target.clone()
    bad[2] = 37
    with pytest.raises(RuntimeError, match=r"target 37 is out of range for 37 classes \(and is not ignore_index="):
        FORWARD(hidden, weight, bad, bias, -100, "mean", True)
    bad[2] = -1
    with pytest.raises(RuntimeError, match="target -1 is out of range"):
        BACKWARD(torch.tensor(1.0), hidden, weight, bad, bias, torch.zeros(6), -100, "mean")
    with pytest.raises(RuntimeError, match="compute_grad needs a scalar loss"):
        FORWARD(hidden, weight, target, bias, -100, "none", True)
    with pytest.raises(RuntimeError, match=r"has E=8 features but weight \[37, 7\] has 7"):
        FORWARD(hidden, weight[:, :7], target, bias, -100, "mean", False)
    with pytest.raises(RuntimeError, match=r"expected target of shape \[6\]"):
        FORWARD(hidden, weight, target[:5], bias, -100, "mean", False)
    with pytest.raises(RuntimeError, match=r"grad_loss has shape \[\], expected \[6\]"):
        BACKWARD(torch.tensor(1.0), hidden, weight, target, bias, torch.zeros(6), -100, "none")
    with pytest.raises(RuntimeError, match=r"expected lse of shape \[6\].*got shape \[5\]"):
        BACKWARD(torch.ones(6), hidden, weight, target, bias, torch.zeros(5), -100, "none")


# ---- GPU: the registered CUDA op at GPT-2's sizes -----------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpt2_head(dtype, bias):
    gen = torch.Generator().manual_seed(50257)
    n, e, v = 1024, 768, 50257
    hidden = torch.randn(n, e, generator=gen).to("cuda", dtype)
    weight = (torch.randn(v, e, generator=gen) * 0.02).to("cuda", dtype)
    b = (torch.randn(v, generator=gen) * 0.1).to("cuda", dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=gen)
    target[::7] = -100
    return hidden, weight, b, target.cuda()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_op_matches_composite(dtype, reduction):
    assert _library.implementation("linear_cross_entropy", "cuda") == "Triton"
    assert _library.implementation("_linear_cross_entropy_backward", "cuda") == "Triton"
    hidden, weight, bias, target = _gpt2_head(dtype, bias=dtype == torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fastdl.ops.linear_cross_entropy(hidden, weight, target, bias, reduction=reduction)
    grad_loss = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, leaves, grad_loss)

    h64, w64, b64 = (as_double(t.detach()) if t is not None else None for t in (hidden, weight, bias))
    ref_loss, ref_lse, *_ = COMPOSITE(h64, w64, target, b64, -100, reduction, False)
    ref_grads = COMPOSITE_BACKWARD(grad_loss.double(), h64, w64, target, b64, ref_lse, -100, reduction)
    assert_close(loss, ref_loss, dtype, "loss", scale=4)
    for name, actual, expected in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert_close(actual, expected, dtype, f"d{name}", scale=4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_memory_stays_below_the_logits():
    """The forward pass at GPT-2's head (which also computes the gradients) never holds the
    [N, V] float32 logits (206 MB): its peak is the weight's gradient plus one chunk."""
    hidden, weight, _, target = _gpt2_head(torch.bfloat16, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    torch.mm(hidden[:16], weight[:16].t())  # cuBLAS allocates its workspace before the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss = fastdl.ops.linear_cross_entropy(hidden, weight, target)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    logits_fp32 = hidden.size(0) * weight.size(0) * 4
    assert extra < logits_fp32, f"peak {extra / 2**20:.0f} MiB above the inputs"
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
