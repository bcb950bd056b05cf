"""fastdl.ops.linear_cross_entropy against F.cross_entropy(hidden @ weight.T + bias) in float64,
for the C++ kernel and the plain-PyTorch composite: values, gradients, every reduction,
ignored rows, chunking, and bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import fastdl.ops
from fastdl.ops import _library
from harness import assert_close, check_compiled, composite_serves_mps, fresh_seed, non_contiguous, run_opcheck

lce_module = importlib.import_module("fastdl.ops.linear_cross_entropy")

OP = torch.ops.fastdl.linear_cross_entropy.default
BACKWARD_OP = torch.ops.fastdl._linear_cross_entropy_backward.default
COMPOSITE = _library.composite("linear_cross_entropy")
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TOL = {torch.float64: {}, torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def reference(hidden, weight, target, bias, ignore_index, reduction):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


def make(n, e, v, dtype, *, bias=True, ignored=0.2, ignore_index=-100):
    hidden = torch.randn(n, e).to(dtype)
    weight = (torch.randn(v, e) / e**0.5).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    target = torch.randint(0, v, (n,))
    target[torch.rand(n) < ignored] = ignore_index
    return hidden, weight, target, b


def loss_and_grads(fn, hidden, weight, target, bias, reduction, grad_seed, **kw):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, leaves[2], reduction=reduction, **kw)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    return loss, [t.grad if t is not None else None for t in leaves]


def composite_fn(hidden, weight, target, bias, reduction, ignore_index=-100):
    """The composite through the same autograd formula (its own gradients in the forward pass)."""
    return fastdl.ops.linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction)


@pytest.mark.parametrize("impl", ["native", "composite"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,e,v,bias", [(1, 8, 3, True), (37, 24, 101, True), (64, 16, 1000, False), (0, 8, 5, True)])
def test_matches_reference(impl, dtype, reduction, n, e, v, bias):
    fresh_seed()
    hidden, weight, target, b = make(n, e, v, dtype, bias=bias)
    if impl == "native":
        loss, grads = loss_and_grads(fastdl.ops.linear_cross_entropy, hidden, weight, target, b, reduction, n)
    else:
        loss, _, *_ = COMPOSITE(hidden, weight, target, b, -100, reduction, False)
        grads = None
    expected, expected_grads = loss_and_grads(reference, hidden, weight, target, b, reduction, n, ignore_index=-100)
    assert loss.dtype == dtype and loss.shape == expected.shape
    if reduction == "mean" and bool((target == -100).all()):  # every row ignored: 0 / 0, as torch
        assert loss.isnan() and expected.isnan()
        return
    assert_close(loss, expected, dtype, **TOL[dtype])
    for got, want in zip(grads or [], expected_grads):
        if want is not None:
            assert got.dtype == dtype
            assert_close(got, want, dtype, **TOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    fresh_seed()
    hidden, weight, target, b = (
        t.requires_grad_() if t.is_floating_point() else t for t in make(13, 6, 9, torch.float64)
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: fastdl.ops.linear_cross_entropy(h, w, target, b, reduction=reduction), (hidden, weight, b)
    )


def test_composite_gradients_equal_native():
    """The composite's forward-pass gradients and its recomputing backward both match the kernel."""
    fresh_seed()
    hidden, weight, target, b = make(50, 12, 70, torch.float32)
    native = OP(hidden, weight, target, b, -100, "sum", True)
    composite = COMPOSITE(hidden, weight, target, b, -100, "sum", True)
    for a, c in zip(native, composite):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    _, lse, _, _, _ = OP(hidden, weight, target, b, -100, "none", False)
    g = torch.randn(50)
    recomputed = BACKWARD_OP(g, hidden, weight, target, b, lse, -100, "none")
    composite_backward = _library.composite("_linear_cross_entropy_backward")(
        g, hidden, weight, target, b, lse, -100, "none"
    )
    for a, c in zip(recomputed, composite_backward):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_many_chunks(monkeypatch):
    """Rows split over several chunks give the single-chunk result (the composite's chunk size is
    lowered; the kernel's own chunks are exercised by the large-vocabulary case)."""
    fresh_seed()
    hidden, weight, target, b = make(45, 8, 50, torch.float64)
    whole = COMPOSITE(hidden, weight, target, b, -100, "mean", True)
    monkeypatch.setattr(lce_module, "_CHUNK_ELEMENTS", 7 * 50)
    assert lce_module.chunk_rows(45, 50) == 7
    chunked = COMPOSITE(hidden, weight, target, b, -100, "mean", True)
    for a, c in zip(whole, chunked):
        torch.testing.assert_close(a, c)


def test_large_vocabulary_spans_chunks():
    """Vocabulary 50257 (GPT-2): 2^23 / V = 166 rows per chunk, so 400 rows take three chunks."""
    fresh_seed()
    hidden, weight, target, _ = make(400, 32, 50257, torch.float32, bias=False, ignored=0.1)
    loss, (gh, gw, _) = loss_and_grads(fastdl.ops.linear_cross_entropy, hidden, weight, target, None, "mean", 1)
    expected, (eh, ew, _) = loss_and_grads(reference, hidden, weight, target, None, "mean", 1, ignore_index=-100)
    assert_close(loss, expected, torch.float32, rtol=1e-5, atol=1e-5)
    assert_close(gh, eh, torch.float32, rtol=1e-4, atol=1e-6)
    assert_close(gw, ew, torch.float32, rtol=1e-4, atol=1e-7)


def test_ignored_rows_and_custom_ignore_index():
    fresh_seed()
    hidden, weight, target, b = make(20, 8, 10, torch.float64, ignored=0.5, ignore_index=3)
    loss, (gh, _, _) = loss_and_grads(
        fastdl.ops.linear_cross_entropy, hidden, weight, target, b, "none", 0, ignore_index=3
    )
    expected = reference(hidden, weight, target, b, 3, "none")
    assert_close(loss, expected, torch.float64)
    assert torch.all(loss[target == 3] == 0) and torch.all(gh[target == 3] == 0)


def test_all_rows_ignored():
    """As torch: the mean is NaN (0 / 0), the sum 0 with zero gradients."""
    hidden, weight, _, b = make(6, 4, 5, torch.float32)
    target = torch.full((6,), -100)
    assert fastdl.ops.linear_cross_entropy(hidden, weight, target, b).isnan()
    assert torch.isnan(F.cross_entropy(hidden @ weight.t() + b, target))
    h = hidden.clone().requires_grad_()
    fastdl.ops.linear_cross_entropy(h, weight, target, b, reduction="sum").backward()
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_nan_in_hidden_gives_nan():
    hidden, weight, target, _ = make(4, 8, 40, torch.float32, bias=False, ignored=0.0)
    hidden[1, 3] = float("nan")
    loss = fastdl.ops.linear_cross_entropy(hidden, weight, target, reduction="none")
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()


def test_extra_leading_dimensions_and_non_contiguous():
    fresh_seed()
    hidden, weight, target, b = make(24, 16, 30, torch.float32)
    loss = fastdl.ops.linear_cross_entropy(
        non_contiguous(hidden).reshape(4, 6, 16), non_contiguous(weight), target.view(4, 6), b
    )
    assert_close(loss, reference(hidden, weight, target, b, -100, "mean"), torch.float32, **TOL[torch.float32])


def test_no_gradient_work_without_grad():
    hidden, weight, target, b = make(5, 4, 6, torch.float32)
    _, _, gh, gw, gb = OP(hidden, weight, target, b, -100, "mean", False)
    assert gh.numel() == gw.numel() == gb.numel() == 0


def test_tied_weight_gets_both_gradients_scaled():
    """A weight used by an embedding and the loss (GPT-2's tied head) gets the sum of both
    gradients, the loss's scaled by the upstream gradient (1 hands the precomputed gradient on
    as it is, and autograd adds the embedding's into it)."""
    fresh_seed()
    hidden, weight, target, _ = make(12, 8, 20, torch.float64, ignored=0.0)
    tokens = torch.randint(0, 20, (12,))
    for scale in (1.0, 2.5):
        grads = []
        for fn in (fastdl.ops.linear_cross_entropy, lambda h, w, t: reference(h, w, t, None, -100, "mean")):
            w = weight.clone().requires_grad_()
            loss = fn(F.embedding(tokens, w) + hidden, w, target)
            (loss * scale).backward()
            grads.append(w.grad)
        assert_close(grads[0], grads[1], torch.float64)


def test_backward_twice_through_one_call():
    """retain_graph=True: the gradients precomputed by the forward pass serve every backward."""
    fresh_seed()
    hidden, weight, target, b = make(6, 4, 9, torch.float64)
    for reduction in ("mean", "sum", "none"):
        w = weight.clone().requires_grad_()
        loss = fastdl.ops.linear_cross_entropy(hidden, w, target, b, reduction=reduction).sum()
        first = torch.autograd.grad(loss, w, retain_graph=True)[0]
        second = torch.autograd.grad(loss, w, retain_graph=True)[0]
        expected = torch.autograd.grad(reference(hidden, w, target, b, -100, reduction).sum(), w)[0]
        assert_close(first, expected, torch.float64)
        assert_close(second, expected, torch.float64)


def test_opcheck():
    fresh_seed()
    hidden, weight, target, b = (
        t.requires_grad_() if t.is_floating_point() else t for t in make(9, 8, 12, torch.float32)
    )
    run_opcheck(OP, (hidden, weight, target, b, -100, "mean", True))
    run_opcheck(OP, (hidden, weight, target, None, -100, "none", False))


def test_torch_compile():
    fresh_seed()
    hidden, weight, target, b = (
        t.requires_grad_() if t.is_floating_point() else t for t in make(16, 8, 20, torch.float32)
    )

    def fn(h, w, b):
        return fastdl.ops.linear_cross_entropy(h, w, target, b) * 3

    check_compiled(fn, hidden, weight, b)


def test_composite_serves_mps():
    assert composite_serves_mps("linear_cross_entropy") and composite_serves_mps("_linear_cross_entropy_backward")


@pytest.mark.parametrize("impl", ["native", "composite"])
@pytest.mark.parametrize(
    "change,message",
    [
        (dict(hidden=torch.ones(3, 4, dtype=torch.int64)), "hidden has unsupported dtype"),
        (dict(target=torch.zeros(3, dtype=torch.int32)), "target must be int64"),
        (dict(weight=torch.ones(5, 4, dtype=torch.float64)), "weight has dtype"),
        (dict(hidden=torch.ones(3, 2, 4)), r"expected hidden to be a 2-D tensor"),
        (dict(weight=torch.ones(5, 3)), r"has E=4 features but weight \[5, 3\] has 3"),
        (dict(weight=torch.ones(0, 4), bias=None), "weight has no classes"),
        (dict(target=torch.zeros(4, dtype=torch.int64)), r"expected target of shape \[3\]"),
        (dict(bias=torch.ones(4)), r"expected bias of shape \[5\]"),
        (dict(target=torch.tensor([0, 5, 1])), "target 5 is out of range for 5 classes"),
        (dict(target=torch.tensor([0, -3, 1])), "target -3 is out of range"),
        (dict(reduction="avg"), "reduction must be one of"),
        (dict(reduction="none", compute_grad=True), "compute_grad needs a scalar loss"),
    ],
)
def test_bad_input(impl, change, message):
    args = dict(
        hidden=torch.ones(3, 4),
        weight=torch.ones(5, 4),
        target=torch.zeros(3, dtype=torch.int64),
        bias=torch.ones(5),
        ignore_index=-100,
        reduction="mean",
        compute_grad=False,
    )
    args.update(change)
    fn = OP if impl == "native" else COMPOSITE
    with pytest.raises(RuntimeError, match=message):
        fn(*args.values())


def test_wrapper_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastdl.ops.linear_cross_entropy(
            torch.ones(2, 3), torch.ones(4, 3), torch.zeros(2, dtype=torch.int64), reduction="avg"
        )


def test_backward_op_checks_grad_and_lse():
    hidden, weight, target, b = make(3, 4, 5, torch.float32)
    lse = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"grad_loss has shape \[\], expected \[3\]"):
        BACKWARD_OP(torch.tensor(1.0), hidden, weight, target, b, lse, -100, "none")
    with pytest.raises(RuntimeError, match=r"expected lse of shape \[3\]"):
        BACKWARD_OP(torch.tensor(1.0), hidden, weight, target, b, torch.zeros(2), -100, "mean")
