"""fastdl.ops.layer_norm (and fastdl.nn.LayerNorm) against a float64 reference built on
torch.nn.functional.layer_norm, for the C++ kernel and the plain-PyTorch composite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl.nn
import fastdl.ops
from fastdl.ops import _library
from harness import assert_close, check_compiled, composite_serves_mps, fresh_seed, non_contiguous
from optester import OpTester, Sample, dtype_name

OP = torch.ops.fastdl.layer_norm.default
COMPOSITE_BACKWARD = _library.composite("_layer_norm_backward")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (input shape, normalized_shape): one row, odd sizes around the 16-lane vectors, 2-D rows, no rows
SHAPES = [
    ((1, 16), [16]),
    ((3, 5, 7), [7]),
    ((4, 33), [33]),
    ((2, 3, 5, 7), [5, 7]),
    ((3, 4, 9), [4, 9]),
    ((6, 771), [771]),
    ((0, 8), [8]),
]


def reference(x, shape, weight, bias, eps, residual):
    total = x.double() if residual is None else (x + residual).double()
    w = None if weight is None else weight.double()
    b = None if bias is None else bias.double()
    return F.layer_norm(total, shape, w, b, eps), total


def make(shape, normalized_shape, dtype, *, affine=(True, True), residual=False):
    x = torch.randn(shape).to(dtype) * 3 + 1
    w = torch.randn(normalized_shape).to(dtype) if affine[0] else None
    b = torch.randn(normalized_shape).to(dtype) if affine[1] else None
    r = torch.randn(shape).to(dtype) if residual else None
    return x, w, b, r


class TestLayerNorm(OpTester):
    op = OP
    differentiable = (0, 2, 3, 4)  # input, weight, bias, residual
    # torch's rule for layer_norm: float32, whatever the autocast dtype
    autocast_dtype = torch.float32

    def samples(self):
        for dtype in DTYPES:
            for shape, normalized_shape in SHAPES:
                for residual in (False, True):
                    x, w, b, r = make(shape, normalized_shape, dtype, residual=residual)
                    yield Sample(
                        (x, normalized_shape, w, b, r, 1e-5),
                        name=f"{dtype_name(dtype)}-{shape}-{'residual' if residual else 'plain'}",
                    )
        for affine in ((False, False), (True, False), (False, True)):
            x, w, b, r = make((5, 40), [40], torch.float32, affine=affine, residual=True)
            yield Sample((x, [40], w, b, r, 1e-5), name=f"weight{affine[0]}-bias{affine[1]}")
        x, _, _, _ = make((3, 24), [24], torch.float32, affine=(False, False))
        yield Sample((x, [24], None, None, None, 1e-5), name="no_weight_bias_or_residual")
        x, w, b, r = make((7, 48), [48], torch.float32, residual=True)
        yield Sample(
            (non_contiguous(x), [48], non_contiguous(w), b, non_contiguous(r), 0.5), name="non_contiguous-eps0.5"
        )

    def reference(self, x, normalized_shape, weight, bias, residual, eps):
        return reference(x, normalized_shape, weight, bias, eps, residual)

    def assert_matches(self, sample, result, expected):
        x, _, _, _, residual, _ = sample.args
        y, total = result[:2]
        assert y.dtype == sample.dtype and y.shape == x.shape
        assert_close(y, expected[0], sample.dtype)
        if residual is not None:
            assert torch.equal(total, x + residual)  # the sum is exactly input + residual in input's dtype

    def compile_sample(self):
        x, w, b, r = make((4, 32), [32], torch.float32, residual=True)
        return Sample((x, [32], w, b, r, 1e-5))

    def autocast_sample(self):
        """A bfloat16 branch output meets a float32 residual stream: the op keeps the stream's dtype."""
        return Sample((torch.randn(4, 16), [16], torch.ones(16), torch.zeros(16), torch.randn(4, 16).bfloat16(), 1e-5))

    def bad_inputs(self):
        return [
            ((torch.ones(2, 4, dtype=torch.int32), [4], None, None, None, 1e-5), {}, RuntimeError, "unsupported dtype"),
            (
                (torch.ones(2, 4), [5], None, None, None, 1e-5),
                {},
                RuntimeError,
                "does not match the trailing dimensions",
            ),
            ((torch.ones(2, 4), [], None, None, None, 1e-5), {}, RuntimeError, "non-empty"),
            (
                (torch.ones(2, 4), [4], torch.ones(3), None, None, 1e-5),
                {},
                RuntimeError,
                r"expected weight of shape \[4\]",
            ),
            (
                (torch.ones(2, 4), [4], None, torch.ones(4, dtype=torch.float64), None, 1e-5),
                {},
                RuntimeError,
                "bias has dtype",
            ),
            (
                (torch.ones(2, 4), [4], None, None, torch.ones(3, 4), 1e-5),
                {},
                RuntimeError,
                r"residual has shape \[3, 4\]",
            ),
            ((torch.ones(2, 4), [4], None, None, None, float("nan")), {}, RuntimeError, "eps must be finite"),
            ((torch.ones(2, 4), [4], None, None, None, -1.0), {}, RuntimeError, "eps must be finite and >= 0"),
        ]


def test_wrapper_without_weight_or_bias_and_int_shape():
    fresh_seed()
    x, w, b, r = make((5, 40), [40], torch.float32, affine=(False, True), residual=True)
    y, _ = fastdl.ops.layer_norm(x, 40, w, b, residual=r)
    assert_close(y, reference(x, [40], w, b, 1e-5, r)[0], torch.float32)


def test_constant_rows_give_bias():
    """Zero variance: rstd = 1/sqrt(eps), the output is the bias exactly (no NaN)."""
    x = torch.full((3, 20), 7.25)
    b = torch.randn(20)
    assert torch.equal(fastdl.ops.layer_norm(x, 20, torch.randn(20), b), b.expand(3, 20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    fresh_seed()
    x, w, b, r = make((9, 130), [130], dtype, residual=True)
    g_out, g_total = torch.randn(9, 130).to(dtype), torch.randn(9, 130).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y, total = fastdl.ops.layer_norm(leaves[0], 130, leaves[1], leaves[2], residual=leaves[3])
    torch.autograd.backward([y, total], [g_out, g_total])
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b, r)]
    ref_y, ref_total = reference(ref_leaves[0], [130], ref_leaves[1], ref_leaves[2], 1e-5, ref_leaves[3])
    torch.autograd.backward([ref_y, ref_total], [g_out.double(), g_total.double()])
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, dtype, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}))


def test_backward_native_equals_composite():
    fresh_seed()
    x, w, _, _ = make((11, 70), [70], torch.float32)
    dy = torch.randn(11, 70)
    _, _, mean, rstd = OP(x, [70], w, None, None, 1e-5)
    native = torch.ops.fastdl._layer_norm_backward.default(dy, x, w, mean, rstd, [70], [True, True, True])
    composite = COMPOSITE_BACKWARD(dy, x, w, mean, rstd, [70], [True, True, True])
    for a, c in zip(native, composite):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_weight_gradient_does_not_depend_on_threads():
    fresh_seed()
    x, w, b, _ = make((300, 64), [64], torch.float32)
    dy = torch.randn(300, 64)
    _, _, mean, rstd = OP(x, [64], w, b, None, 1e-5)
    threads = torch.get_num_threads()
    results = []
    for n in (1, max(2, threads)):
        torch.set_num_threads(n)
        results.append(torch.ops.fastdl._layer_norm_backward.default(dy, x, w, mean, rstd, [64], [True, True, True]))
    torch.set_num_threads(threads)
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_only_the_sum_is_used():
    """A graph that uses only input + residual gets gradient 1 on both addends."""
    x, r = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    _, total = fastdl.ops.layer_norm(x, 8, None, None, residual=r)
    total.sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 8)) and torch.equal(r.grad, torch.ones(2, 8))


def test_wrapper_under_torch_compile():
    fresh_seed()
    x, w, b, r = (t.requires_grad_() for t in make((4, 32), [32], torch.float32, residual=True))

    def fn(x, w, b, r):
        y, total = fastdl.ops.layer_norm(x, 32, w, b, residual=r)
        return y * 2 + total

    check_compiled(fn, x, w, b, r)


def test_module_is_a_drop_in():
    fresh_seed()
    theirs = torch.nn.LayerNorm([5, 6], eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = fastdl.nn.LayerNorm([5, 6], eps=1e-6)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert repr(ours) == repr(theirs)
    x, r = torch.randn(3, 5, 6), torch.randn(3, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    y, total = ours(x, r)
    torch.testing.assert_close(y, theirs(x + r))
    assert isinstance(ours, torch.nn.LayerNorm)
    no_bias = fastdl.nn.LayerNorm(6, bias=False)
    assert list(no_bias.state_dict()) == ["weight"]
    torch.testing.assert_close(no_bias(x), F.layer_norm(x, (6,), no_bias.weight))


def test_composite_serves_mps():
    assert composite_serves_mps("layer_norm") and composite_serves_mps("_layer_norm_backward")


def test_backward_op_checks_its_statistics():
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"expected mean of shape \[3\]"):
        torch.ops.fastdl._layer_norm_backward.default(
            x, x, None, torch.zeros(2), torch.ones(3), [8], [True, False, False]
        )
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.fastdl._layer_norm_backward.default(
            x[:2], x, None, torch.zeros(3), torch.ones(3), [8], [True, False, False]
        )
