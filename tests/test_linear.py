"""fastdl.ops.linear (and fastdl.nn.Linear) against a float64 reference, for the C++ kernel (its
weight-streaming tiles for few rows and its BLAS path) and the plain-PyTorch composite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdl.nn
import fastdl.ops
from harness import assert_close, check_compiled, composite_serves_mps, fresh_seed, non_contiguous
from optester import OpTester, Sample, dtype_name

# The tiles take a different path per CPU capability: every test runs on each one the CPU has.
pytestmark = pytest.mark.usefixtures("every_cpu_capability")

OP = torch.ops.fastdl.linear.default
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (input shape, out_features): rows 1..16 hit every tile height (one and two passes of 8) and
# BLAS beyond; in_features around the 8- and 16-lane vectors; output counts off the 4-row tiles.
SHAPES = [
    ((1, 16), 5),
    ((2, 33), 7),
    ((3, 7), 9),
    ((5, 2, 64), 13),
    ((8, 100), 37),
    ((9, 48), 3),
    ((16, 17), 66),
    ((17, 40), 12),
    ((64, 24), 10),
    ((4, 1), 6),
    ((3, 5), 4),
]


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def make(shape, outputs, dtype, bias=True):
    x = torch.randn(shape).to(dtype)
    w = torch.randn(outputs, shape[-1]).to(dtype)
    return x, w, torch.randn(outputs).to(dtype) if bias else None


class TestLinear(OpTester):
    op = OP
    differentiable = (0, 1, 2)
    gradgradcheck = True
    autocast_dtype = torch.bfloat16  # the "lower" rule, as torch's linear

    def samples(self):
        for dtype in DTYPES:
            for shape, outputs in SHAPES:
                for bias in (True, False):
                    yield Sample(
                        make(shape, outputs, dtype, bias),
                        name=f"{dtype_name(dtype)}-{shape}-{outputs}-{'bias' if bias else 'no_bias'}",
                    )
            # no rows, no outputs, no input features (every output is the bias)
            yield Sample(
                (torch.randn(0, 3).to(dtype), torch.randn(4, 3).to(dtype), torch.randn(4).to(dtype)),
                name=f"{dtype_name(dtype)}-no_rows",
            )
            yield Sample(
                (torch.randn(2, 5, 3).to(dtype), torch.randn(0, 3).to(dtype), None),
                name=f"{dtype_name(dtype)}-no_outputs",
            )
            yield Sample(
                (torch.randn(3, 0).to(dtype), torch.randn(4, 0).to(dtype), torch.randn(4).to(dtype)),
                name=f"{dtype_name(dtype)}-no_features",
            )
        x, w, b = make((6, 40), 19, torch.float32)
        for layout, view in (
            ("non_contiguous", non_contiguous(x)),
            ("transposed", x.T.contiguous().T),
            ("expanded", x[:1].expand(6, 40)),
        ):
            yield Sample((view, w, b), name=f"{layout}_input")
        # a non-contiguous weight and bias take the BLAS path
        yield Sample((x, torch.randn(19, 80)[:, ::2], b[None].expand(2, -1)[0]), name="non_contiguous_weight")

    def reference(self, x, w, b):
        return reference(x, w, b)

    def tolerance(self, sample):
        # sums of up to 100 products of N(0, 1) values: the tolerance grows with their size
        scale = 1 + sample.args[0].shape[-1] ** 0.5
        return {"atol": {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 5e-2}[sample.dtype] * scale}

    def compile_sample(self):
        return Sample(make((2, 5, 32), 12, torch.float32))

    def autocast_sample(self):
        return Sample(make((4, 16), 8, torch.float32))

    def bad_inputs(self):
        return [
            (
                (torch.ones(2, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32), None),
                {},
                RuntimeError,
                "unsupported dtype",
            ),
            ((torch.ones(2, 4), torch.ones(3, 4, dtype=torch.float64), None), {}, RuntimeError, "weight has dtype"),
            (
                (torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, dtype=torch.float64)),
                {},
                RuntimeError,
                "bias has dtype",
            ),
            ((torch.ones(()), torch.ones(3, 1), None), {}, RuntimeError, "at least 1 dimension"),
            ((torch.ones(2, 4), torch.ones(3, 4, 1), None), {}, RuntimeError, r"expected weight to be a 2-D tensor"),
            ((torch.ones(2, 5), torch.ones(3, 4), None), {}, RuntimeError, r"input has 5 features .* expects 4"),
            ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(4)), {}, RuntimeError, r"expected bias of shape \[3\]"),
        ]


def test_non_finite_values_propagate():
    x, w, b = make((3, 20), 6, torch.float32)
    x[0, 4], x[1, 19], w[2, 0] = float("inf"), float("nan"), float("-inf")
    torch.testing.assert_close(fastdl.ops.linear(x, w, b), F.linear(x, w, b), equal_nan=True)


def test_gradients_match_reference():
    fresh_seed()
    x, w, b = (t.requires_grad_() for t in make((4, 3, 21), 11, torch.float32))
    refs = [t.detach().double().requires_grad_() for t in (x, w, b)]
    grad = torch.randn(4, 3, 11)
    fastdl.ops.linear(x, w, b).backward(grad)
    reference(*refs).backward(grad.double())
    for mine, ref in zip((x, w, b), refs):
        assert_close(mine.grad, ref.grad, atol=1e-5)


def test_wrapper_under_torch_compile():
    fresh_seed()
    x, w, b = (t.requires_grad_() for t in make((2, 5, 32), 12, torch.float32))
    check_compiled(lambda x, w, b: fastdl.ops.linear(x, w, b).relu(), x, w, b)


def test_autocast_matches_torch():
    x, w, b = make((4, 16), 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fastdl.ops.linear(x, w, b), F.linear(x, w, b)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_module_is_a_drop_in():
    fresh_seed()
    theirs = torch.nn.Linear(24, 9)
    ours = fastdl.nn.Linear(24, 9)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert repr(ours) == repr(theirs) and isinstance(ours, torch.nn.Linear)
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    assert list(fastdl.nn.Linear(4, 2, bias=False).state_dict()) == ["weight"]


def test_composite_serves_mps():
    assert composite_serves_mps("linear")
