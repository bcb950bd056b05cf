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
from harness import assert_close, check_compiled, composite_serves_mps, fresh_seed, non_contiguous
from optester import OpTester, Sample, dtype_name

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


def op_reference(hidden, weight, target, bias, ignore_index, reduction, compute_grad):
    """The op's five outputs in float64: the loss, each row's log-sum-exp and, when
    ``compute_grad``, the gradients of the loss (else empty tensors)."""
    leaves = [t.double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    with torch.enable_grad():
        loss = reference(leaves[0], leaves[1], target, leaves[2], ignore_index, reduction)
        logits = leaves[0] @ leaves[1].t() + (leaves[2] if bias is not None else 0)
        lse = torch.logsumexp(logits, dim=1).detach()
    if not compute_grad:
        return loss.detach(), lse, *(torch.empty(0, dtype=torch.float64) for _ in range(3))
    loss.backward()
    grad_bias = leaves[2].grad if bias is not None else torch.empty(0, dtype=torch.float64)
    return loss.detach(), lse, leaves[0].grad, leaves[1].grad, grad_bias


# (N, E, V, bias): one row, a vocabulary off every vector width, a large one, no rows
SHAPES = [(1, 8, 3, True), (37, 24, 101, True), (64, 16, 1000, False), (0, 8, 5, True)]
# (reduction, compute_grad): the scalar losses with and without the forward pass's gradients
MODES = [("mean", True), ("mean", False), ("sum", True), ("sum", False), ("none", False)]


class TestLinearCrossEntropy(OpTester):
    op = OP
    differentiable = (0, 1, 3)  # hidden, weight, bias
    autocast_dtype = torch.bfloat16  # the "lower" rule; the log-sum-exp stays in float32
    autocast_output_dtypes = (torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16)

    def samples(self):
        for dtype in DTYPES:
            for n, e, v, bias in SHAPES:
                for reduction, compute_grad in MODES:
                    hidden, weight, target, b = make(n, e, v, dtype, bias=bias)
                    yield Sample(
                        (hidden, weight, target, b, -100, reduction, compute_grad),
                        name=f"{dtype_name(dtype)}-{n}x{e}x{v}-{'bias' if bias else 'no_bias'}-{reduction}"
                        + ("-grad" if compute_grad else ""),
                    )

    def reference(self, *args):
        return op_reference(*args)

    def assert_matches(self, sample, result, expected):
        hidden, weight, target, bias, ignore_index, reduction, compute_grad = sample.args
        dtype = sample.dtype
        loss, lse, *grads = result
        assert loss.dtype == dtype and loss.shape == expected[0].shape
        if reduction == "mean" and bool((target == ignore_index).all()):  # every row ignored: 0 / 0, as torch
            assert loss.isnan() and expected[0].isnan()
            return
        assert_close(loss, expected[0], dtype, **TOL[dtype])
        assert lse.dtype == lce_module.loss_dtype(dtype)
        assert_close(lse, expected[1], dtype, **TOL[dtype])
        for got, want in zip(grads, expected[2:]):
            if compute_grad and want.numel():
                assert got.dtype == dtype
                assert_close(got, want, dtype, **TOL[dtype])
            else:  # no gradient asked for (or no bias): nothing computed
                assert got.numel() == 0

    def gradcheck_samples(self):
        hidden, weight, target, b = make(13, 6, 9, torch.float64)
        for reduction, compute_grad in MODES:
            yield Sample(
                (hidden, weight, target, b, -100, reduction, compute_grad),
                name=f"{reduction}" + ("-grad" if compute_grad else ""),
            )

    def test_gradcheck(self, impl, sample_name):
        if impl == "composite" and sample_name.endswith("-grad"):
            # the native op's autograd formula hands these gradients on; differentiated directly,
            # the composite's in-place softmax would be in the way
            pytest.skip("the composite's forward-pass gradients are not differentiated through")
        super().test_gradcheck(impl, sample_name)

    def opcheck_samples(self):
        # opcheck traces each sample several times: two small ones, with and without the gradients
        hidden, weight, target, b = make(9, 8, 12, torch.float32)
        yield Sample((hidden, weight, target, b, -100, "mean", True), name="mean-grad")
        yield Sample((hidden, weight, target, None, -100, "none", False), name="none-no_bias")

    def compile_sample(self):
        return Sample((*make(16, 8, 20, torch.float32), -100, "mean", True))

    def bad_inputs(self):
        def args(**change):
            values = dict(
                hidden=torch.ones(3, 4),
                weight=torch.ones(5, 4),
                target=torch.zeros(3, dtype=torch.int64),
                bias=torch.ones(5),
                ignore_index=-100,
                reduction="mean",
                compute_grad=False,
            )
            values.update(change)
            return tuple(values.values())

        return [
            (args(hidden=torch.ones(3, 4, dtype=torch.int64)), {}, RuntimeError, "hidden has unsupported dtype"),
            (args(target=torch.zeros(3, dtype=torch.int32)), {}, RuntimeError, "target must be int64"),
            (args(weight=torch.ones(5, 4, dtype=torch.float64)), {}, RuntimeError, "weight has dtype"),
            (args(hidden=torch.ones(3, 2, 4)), {}, RuntimeError, r"expected hidden to be a 2-D tensor"),
            (args(weight=torch.ones(5, 3)), {}, RuntimeError, r"has E=4 features but weight \[5, 3\] has 3"),
            (args(weight=torch.ones(0, 4), bias=None), {}, RuntimeError, "weight has no classes"),
            (args(target=torch.zeros(4, dtype=torch.int64)), {}, RuntimeError, r"expected target of shape \[3\]"),
            (args(bias=torch.ones(4)), {}, RuntimeError, r"expected bias of shape \[5\]"),
            (args(target=torch.tensor([0, 5, 1])), {}, RuntimeError, "target 5 is out of range for 5 classes"),
            (args(target=torch.tensor([0, -3, 1])), {}, RuntimeError, "target -3 is out of range"),
            (args(reduction="avg"), {}, RuntimeError, "reduction must be one of"),
            (args(reduction="none", compute_grad=True), {}, RuntimeError, "compute_grad needs a scalar loss"),
        ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,e,v,bias", SHAPES)
def test_wrapper_gradients_match_reference(dtype, reduction, n, e, v, bias):
    """Through autograd: the precomputed gradients scaled by the upstream one, or for "none" the
    backward op's."""
    fresh_seed()
    hidden, weight, target, b = make(n, e, v, dtype, bias=bias)
    loss, grads = loss_and_grads(fastdl.ops.linear_cross_entropy, hidden, weight, target, b, reduction, n)
    expected, expected_grads = loss_and_grads(reference, hidden, weight, target, b, reduction, n, ignore_index=-100)
    if reduction == "mean" and bool((target == -100).all()):  # every row ignored: 0 / 0, as torch
        assert loss.isnan() and expected.isnan()
        return
    assert_close(loss, expected, dtype, **TOL[dtype])
    for got, want in zip(grads, expected_grads):
        if want is not None:
            assert got.dtype == dtype
            assert_close(got, want, dtype, **TOL[dtype])


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


def test_wrapper_under_torch_compile():
    fresh_seed()
    hidden, weight, target, b = (
        t.requires_grad_() if t.is_floating_point() else t for t in make(16, 8, 20, torch.float32)
    )

    def fn(h, w, b):
        return fastdl.ops.linear_cross_entropy(h, w, target, b) * 3

    check_compiled(fn, hidden, weight, b)


def test_composite_serves_mps():
    assert composite_serves_mps("linear_cross_entropy") and composite_serves_mps("_linear_cross_entropy_backward")


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
