"""Every CPU kernel path, forward and backward, at small sizes, on every capability this CPU has.

Each case is chosen to reach one path of the C++ kernels (conv2d's row tiles, direct tiles,
Winograd, strided 1x1, grouped GEMM and the weight gradients for few channels and large maps;
attention's tiled and BLAS paths; linear's weight-streaming tiles; the vector loops of the LSTM,
layer norm, linear cross-entropy and the detection ops) and is compared with a float64
reference. The ``every_cpu_capability`` fixture (conftest.py) runs each under ``avx512``,
``avx2`` and ``default`` as far as the CPU supports them.

The module is small on purpose: CI also runs it under ``qemu-x86_64 -cpu Haswell`` (AVX2, no
AVX-512) and ``-cpu Nehalem`` (neither), where an instruction the CPU lacks is a crash.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastdl.backends.cpu
import fastdl.nn
import fastdl.ops
from fastdl.ops import _library
from harness import LAYOUTS, fresh_seed, with_layout

pytestmark = pytest.mark.usefixtures("every_cpu_capability")

DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare with ``expected`` (float64), relative to the reference's magnitude."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


def check_forward_backward(out, expected, pairs, dtype) -> None:
    """``out`` against the float64 ``expected``, then the gradients of each (ours, reference)
    input pair after backpropagating the same random output gradient through both."""
    assert_close_to(out, expected, dtype)
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for mine, reference in pairs:
        assert_close_to(mine.grad, reference.grad, dtype)


def test_reported_capability():
    """Under an emulated CPU, CI names the capability the emulator offers: a test that fails if
    the emulator exposed more (AVX-512) than intended, so the guarded paths really ran."""
    expected = os.environ.get("FASTDL_EXPECT_CPU_CAPABILITY")
    supported = fastdl.backends.cpu.supported_cpu_capabilities()
    assert supported[0] == "default"
    if expected:
        assert supported[-1] == expected


# ---- conv2d -----------------------------------------------------------------------------------

# name: (input shape, weight shape, stride, padding, dilation, groups)
CONV_CASES = {
    # the reproduction: CIFAR's first layer, few input channels on a 32x32 map
    "cifar_first_layer": ((2, 3, 32, 32), (64, 3, 3, 3), 1, 1, 1, 1),
    "few_output_channels": ((2, 16, 20, 20), (4, 16, 3, 3), 1, 1, 1, 1),
    "stem_7x7_stride2": ((1, 3, 37, 37), (16, 3, 7, 7), 2, 3, 1, 1),
    "winograd_3x3": ((4, 32, 16, 16), (32, 32, 3, 3), 1, 1, 1, 1),
    "direct_strided": ((2, 16, 15, 15), (40, 16, 3, 3), 2, 1, 1, 1),
    "direct_partial_tiles": ((2, 12, 9, 7), (20, 12, 3, 3), 1, 1, 1, 1),  # 63 pixels, 20 channels
    "row_longer_than_a_sweep": ((1, 3, 6, 101), (6, 3, 3, 3), 1, 1, 1, 1),
    "pointwise_strided": ((2, 16, 14, 14), (32, 16, 1, 1), 2, 0, 1, 1),
    "dilated": ((2, 8, 17, 17), (12, 8, 3, 3), 1, 2, 2, 1),
    "grouped": ((2, 8, 10, 10), (8, 2, 3, 3), 1, 1, 1, 4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CONV_CASES)
def test_conv2d_forward_backward(name, layout, dtype):
    fresh_seed()
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[name]
    x64 = torch.randn(x_shape, dtype=torch.float64)
    w64 = torch.randn(w_shape, dtype=torch.float64) / math.sqrt(w_shape[1] * w_shape[2] * w_shape[3])
    b64 = torch.randn(w_shape[0], dtype=torch.float64)
    x = with_layout(x64.to(dtype), layout).requires_grad_()
    w, b = w64.to(dtype).requires_grad_(), b64.to(dtype).requires_grad_()
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = fastdl.ops.conv2d(x, w, b, activation="relu", **args)
    x64.requires_grad_(), w64.requires_grad_(), b64.requires_grad_()
    expected = F.relu(F.conv2d(x64, w64, b64, **args))
    check_forward_backward(out, expected, ((x, x64), (w, w64), (b, b64)), dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu6"])
@pytest.mark.parametrize("name", ["cifar_first_layer", "winograd_3x3", "direct_strided"])
def test_conv2d_activations(name, activation):
    fresh_seed()
    x_shape, w_shape, stride, padding, dilation, groups = CONV_CASES[name]
    x, w = torch.randn(x_shape), torch.randn(w_shape) / math.sqrt(w_shape[1] * 9)
    args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    act = {"silu": F.silu, "gelu": F.gelu, "relu6": F.relu6}[activation]
    expected = act(F.conv2d(x.double(), w.double(), **args))
    assert_close_to(fastdl.ops.conv2d(x, w, activation=activation, **args), expected, torch.float32)


# ---- attention --------------------------------------------------------------------------------

# name: (B, H, H_kv, N_q, N_k, D, causal, mask); the tiles need D % 16 == 0 and N_q >= 64
ATTENTION_CASES = {
    "tiled_d64": (1, 2, 2, 70, 70, 64, False, False),
    "tiled_causal_gqa": (2, 4, 2, 65, 80, 32, True, False),
    "tiled_d32_masked": (1, 2, 2, 64, 50, 32, False, True),
    # two query blocks (128 + 3 rows) and two key blocks (256 + 44 keys, a ragged strip): every
    # row and column remainder of the S and O tiles, and 48 columns (3 AVX2 O tiles; 48 of 64 on AVX-512)
    "tiled_ragged_causal": (1, 2, 1, 131, 300, 48, True, False),
    "tiled_ragged_masked": (1, 1, 1, 133, 270, 16, False, True),
    "tiled_causal_masked_nq_lt_nk": (1, 2, 2, 70, 97, 80, True, True),
    "blas_d24_masked": (1, 2, 2, 17, 29, 24, False, True),
    "one_query_causal": (2, 2, 1, 1, 37, 16, True, False),
}


def attention_reference(q, k, v, causal, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask
    if causal:
        nq, nk = scores.shape[-2:]
        hidden = torch.ones(nq, nk, dtype=torch.bool).triu(nk - nq + 1)
        scores = scores.masked_fill(hidden, -math.inf)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_attention_forward_backward(name, contiguous, dtype):
    fresh_seed()
    b, h, hkv, nq, nk, d, causal, masked = ATTENTION_CASES[name]
    q64, k64, v64 = (torch.randn(b, heads, n, d, dtype=torch.float64) for heads, n in ((h, nq), (hkv, nk), (hkv, nk)))
    mask64 = torch.randn(b, h, nq, nk, dtype=torch.float64) if masked else None
    make = (
        (lambda t: t.to(dtype)) if contiguous else (lambda t: t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2))
    )
    q, k, v = (make(t).requires_grad_() for t in (q64, k64, v64))
    mask = None if mask64 is None else mask64.to(dtype)
    out = fastdl.ops.attention(q, k, v, causal=causal, attn_mask=mask)
    for t in (q64, k64, v64):
        t.requires_grad_()
    expected = attention_reference(q64, k64, v64, causal, mask64, 1 / math.sqrt(d))
    check_forward_backward(out, expected, ((q, q64), (k, k64), (v, v64)), dtype)


def poisoned_attention_inputs(poison):
    """q, k, v and a float mask (or None) of a tiled shape with NaN, infinities or float32
    extremes in one place: a query row, a key (every query's scores), a value column, or mask
    entries of every special kind (a hidden row, saturating extremes, NaN and +inf scores)."""
    b, h, nq, nk, d = 1, 2, 70, 90, 32
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for n in (nq, nk, nk))
    mask = None
    if poison == "mask":
        mask = torch.randn(nq, nk, dtype=torch.float64)
        mask[3, 5] = math.nan
        mask[10] = -math.inf
        mask[11, 7] = math.inf
        mask[12] = torch.finfo(torch.float32).min
        mask[13, 40] = torch.finfo(torch.float32).max
        mask[14, 60:] = -math.inf
    else:  # key and value 60: hidden from the first 40 queries when causal
        {"q": q, "k": k, "v": v}[poison][0, 1, 17 if poison == "q" else 60, 3] = math.nan
    return q, k, v, mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poison", ["q", "k", "v", "mask"])
def test_attention_nan_and_inf(poison, causal):
    """NaN in, NaN out, at the reference's places and with its values elsewhere, on every path."""
    fresh_seed()
    q, k, v, mask = poisoned_attention_inputs(poison)
    out = fastdl.ops.attention(
        q.float(), k.float(), v.float(), attn_mask=None if mask is None else mask.float(), causal=causal
    )
    expected, _ = _library.composite("attention")(q, k, v, mask, causal, 1 / math.sqrt(q.size(-1)), 0.0, 0)
    if poison == "mask":  # finfo.min on every key is a value: the mean of the visible v
        # (float64 arithmetic loses the scores against it and sums v instead)
        visible = 12 + k.size(2) - q.size(2) + 1 if causal else k.size(2)
        expected[:, :, 12] = v[:, :, :visible].mean(2)
    if poison == "v":
        # 0 x NaN: rows that do not see the NaN value are NaN in the reference's matmul, and
        # left alone by kernels that skip the keys a row cannot see; the rows that see it are NaN
        sees = torch.arange(q.size(2)) + k.size(2) - q.size(2) >= 60 if causal else slice(None)
        assert out[0, 1, sees, 3].isnan().all()
        out, expected = out[..., 4:], expected[..., 4:]
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=2e-4, equal_nan=True)


# ---- LSTM -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_lstm_forward_backward(bidirectional, dtype):
    fresh_seed()
    reference = torch.nn.LSTM(12, 20, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    mine = fastdl.nn.LSTM(12, 20, num_layers=2, bidirectional=bidirectional, batch_first=True).to(dtype)
    mine.load_state_dict(reference.state_dict())
    x64 = torch.randn(3, 9, 12, dtype=torch.float64)
    x = x64.to(dtype).requires_grad_()
    x64.requires_grad_()
    out, (h, c) = mine(x)
    expected, (h64, c64) = reference(x64)
    for actual, ref in ((out, expected), (h, h64), (c, c64)):
        assert_close_to(actual, ref, dtype)
    (out.sum() + h.sum() + c.sum()).backward()
    (expected.sum() + h64.sum() + c64.sum()).backward()
    assert_close_to(x.grad, x64.grad, dtype)
    for (key, p), p64 in zip(mine.named_parameters(), reference.parameters()):
        assert_close_to(p.grad, p64.grad, dtype)


# ---- layer norm and linear cross-entropy (vector loops built per capability) -----------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_forward_backward(with_residual, dtype):
    fresh_seed()
    x64 = torch.randn(5, 3, 37, dtype=torch.float64)  # 37: two full vectors and a tail
    w64, b64, r64 = torch.randn(37, dtype=torch.float64), torch.randn(37, dtype=torch.float64), torch.randn_like(x64)
    leaves = [t.to(dtype).requires_grad_() for t in (x64, w64, b64, r64)]
    references = [t.requires_grad_() for t in (x64, w64, b64, r64)]
    x, w, b, r = leaves
    out = fastdl.ops.layer_norm(x, 37, w, b, residual=r if with_residual else None)
    out = out[0] if with_residual else out
    xs64 = references[0] + references[3] if with_residual else references[0]
    expected = F.layer_norm(xs64, (37,), references[1], references[2])
    pairs = list(zip(leaves, references))
    check_forward_backward(out, expected, pairs if with_residual else pairs[:3], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_forward_backward(dtype):
    fresh_seed()
    hidden64 = torch.randn(13, 24, dtype=torch.float64)
    weight64 = torch.randn(71, 24, dtype=torch.float64)  # 71 classes: vector rows and a tail
    target = torch.randint(0, 71, (13,))
    target[4] = -100
    hidden, weight = (t.to(dtype).requires_grad_() for t in (hidden64, weight64))
    hidden64.requires_grad_(), weight64.requires_grad_()
    out = fastdl.ops.linear_cross_entropy(hidden, weight, target)
    expected = F.cross_entropy(hidden64 @ weight64.T, target)
    check_forward_backward(out, expected, ((hidden, hidden64), (weight, weight64)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 9], ids=["one_row", "two_passes"])
def test_linear_forward_backward(rows, dtype):
    fresh_seed()
    x64, w64, b64 = (
        torch.randn(rows, 37, dtype=torch.float64),
        torch.randn(23, 37, dtype=torch.float64),
        torch.randn(23, dtype=torch.float64),
    )
    leaves = [t.to(dtype).requires_grad_() for t in (x64, w64, b64)]
    references = [t.requires_grad_() for t in (x64, w64, b64)]
    check_forward_backward(fastdl.ops.linear(*leaves), F.linear(*references), list(zip(leaves, references)), dtype)


# ---- detection ops (their loops are built per capability) --------------------------------------


def random_rois(count: int, batch: int, size: float, dtype) -> torch.Tensor:
    xy = torch.rand(count, 2) * size
    wh = torch.rand(count, 2) * size / 2 + 1
    index = torch.randint(0, batch, (count, 1)).float()
    return torch.cat([index, xy, xy + wh], 1).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_roi_ops_forward_backward(op, layout, dtype):
    fresh_seed()
    features = with_layout(torch.randn(2, 19, 12, 14, dtype=dtype), layout).requires_grad_()
    rois = random_rois(11, 2, 12.0, dtype)
    reference_features = features.detach().double().requires_grad_()
    if op == "roi_align":
        out = fastdl.ops.roi_align(features, rois, (3, 4), spatial_scale=0.75, sampling_ratio=2, aligned=True)
        expected = _library.composite("roi_align")(reference_features, rois.double(), 0.75, 3, 4, 2, True)
    else:
        out = fastdl.ops.roi_pool(features, rois, (3, 4), spatial_scale=0.75)
        expected = _library.composite("roi_pool")(reference_features, rois.double(), 0.75, 3, 4)[0]
    check_forward_backward(out, expected, ((features, reference_features),), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nms(dtype):
    fresh_seed()
    boxes = random_rois(300, 1, 50.0, dtype)[:, 1:]
    scores = torch.rand(300, dtype=dtype)
    keep = fastdl.ops.nms(boxes, scores, 0.4)
    expected = _library.composite("nms")(boxes.double(), scores.double(), 0.4)
    assert torch.equal(keep, expected)
