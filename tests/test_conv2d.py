"""conv2d against float64 ``F.conv2d`` (+ activation), and the modules built on it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl.backends.cpu
import fastdl.nn
import fastdl.ops
from fastdl.ops import _library
from fastdl.ops._utils import suggest_memory_format
from fastdl.ops.conv2d import ACTIVATIONS
from harness import (
    DEVICES,
    LAYOUTS,
    assert_close,
    check_compiled,
    composite_serves_mps,
    fresh_seed,
    needs_cuda,
    run_opcheck,
    with_layout,
)

# The C++ kernels take other paths per CPU capability: every test runs on each one the CPU has.
pytestmark = pytest.mark.usefixtures("every_cpu_capability")

ACTS = list(ACTIVATIONS)
CONV_TOL = {torch.float32: dict(rtol=1e-4), torch.float64: {}, torch.bfloat16: dict(rtol=3e-2, atol=1e-1)}


def assert_conv_close(actual, expected, dtype=torch.float32, pre_activation=None):
    """float32 outputs are sums of hundreds of products that can cancel, so their absolute error
    scales with the largest convolution output (before any activation), not with each value."""
    tol = dict(CONV_TOL[dtype])
    if dtype == torch.float32:
        scale = expected if pre_activation is None else pre_activation
        tol["atol"] = 1e-5 * (1 + scale.abs().max().item()) if scale.numel() else 1e-5
    assert_close(actual, expected, dtype, **tol)


# name: (N, C, H, W, K, (kh, kw), stride, padding, dilation, groups)
CASES = {
    "3x3": (2, 16, 13, 11, 40, (3, 3), 1, 1, 1, 1),
    "1x1_stride2_downsample": (2, 24, 14, 15, 48, (1, 1), 2, 0, 1, 1),
    "1x1_pointwise": (3, 20, 7, 9, 33, (1, 1), 1, 0, 1, 1),
    "7x7_stride2_stem": (2, 3, 33, 30, 16, (7, 7), 2, 3, 1, 1),
    "5x5": (1, 6, 12, 12, 10, (5, 5), 1, 2, 1, 1),
    "non_square_3x5": (2, 5, 10, 13, 7, (3, 5), (2, 1), (1, 2), 1, 1),
    "dilated": (2, 8, 15, 15, 12, (3, 3), 1, 2, 2, 1),
    "dilation_w_only": (1, 4, 9, 16, 35, (3, 3), 1, 1, (1, 3), 1),
    "grouped": (2, 8, 9, 9, 12, (3, 3), 1, 1, 1, 4),
    "depthwise": (2, 16, 10, 10, 16, (3, 3), 1, 1, 1, 16),
    "depthwise_multiplier_stride2": (1, 6, 11, 11, 12, (3, 3), 2, 1, 1, 6),
    "smaller_than_kernel_padded": (2, 4, 2, 3, 6, (5, 5), 1, 2, 1, 1),
    "one_pixel_output": (1, 9, 3, 3, 65, (3, 3), 1, 0, 1, 1),
    "wide_channels": (1, 70, 6, 20, 97, (3, 3), 1, 1, 1, 1),
    # direct tiles with partial tiles of either set: 35 pixels (AVX-512 tiles of 14, AVX2 of 6)
    # and 20 output channels (blocks of 32 resp. 16)
    "direct_partial_tiles": (2, 12, 7, 5, 20, (3, 3), 1, 1, 1, 1),
    # 3x3 stride 1 with enough channels and tiles: the Winograd path (odd sizes: partial tiles)
    "3x3_winograd": (4, 33, 13, 11, 37, (3, 3), 1, 1, 1, 1),
    "3x3_winograd_valid": (3, 40, 16, 17, 48, (3, 3), 1, 0, 1, 1),
    "3x3_winograd_pad2": (2, 32, 12, 12, 64, (3, 3), 1, 2, 1, 1),
    # few tiles for a wide layer (like ResNet's 512-channel 7x7 stage): products split by point
    "3x3_winograd_few_tiles": (8, 200, 5, 5, 160, (3, 3), 1, 1, 1, 1),
    # transformed weights of 8 MB: written with streaming stores
    "3x3_winograd_wide": (2, 256, 11, 11, 512, (3, 3), 1, 1, 1, 1),
    # stride 1 on a large map: the weight gradient's shifted-GEMM path (no im2col)
    "large_map_dilated": (2, 8, 24, 30, 12, (3, 5), 1, (1, 3), (1, 2), 1),
    "large_map_one_image": (1, 8, 24, 30, 12, (3, 3), 1, 1, 1, 1),  # fewer images than threads
    "batch_0": (0, 4, 8, 8, 6, (3, 3), 1, 1, 1, 1),
}


def reference(x, w, b, stride, padding, dilation, groups, activation=None):
    out = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation, groups)
    return ACTIVATIONS[activation](out)


def make_case(case, dtype=torch.float32, device="cpu", layout="contiguous", bias=True):
    n, c, h, w, k, kernel, stride, padding, dilation, groups = case
    x = with_layout(torch.randn(n, c, h, w, dtype=dtype, device=device), layout)
    weight = torch.randn(k, c // groups, *kernel, dtype=dtype, device=device)
    b = torch.randn(k, dtype=dtype, device=device) if bias else None
    return x, weight, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def random_case():
    """A random geometry: kernel up to 7, stride up to 3, dilation up to 2, groups in {1, 2, C}."""
    kh, kw = random.randint(1, 7), random.randint(1, 7)
    sh, sw, dh, dw = random.randint(1, 3), random.randint(1, 3), random.randint(1, 2), random.randint(1, 2)
    ph, pw = random.randint(0, 3), random.randint(0, 3)
    groups = random.choice([1, 1, 2, "depthwise"])
    c = random.randint(1, 12) * (2 if groups == 2 else 1)
    groups = c if groups == "depthwise" else groups
    k = random.randint(1, 40) * groups
    h = random.randint(max(1, dh * (kh - 1) + 1 - 2 * ph), 20)
    w = random.randint(max(1, dw * (kw - 1) + 1 - 2 * pw), 20)
    return (random.randint(1, 3), c, h, w, k, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_reference(name, layout, dtype, device):
    fresh_seed()
    x, w, b, args = make_case(CASES[name], dtype, device, layout)
    out = fastdl.ops.conv2d(x, w, b, **args)
    assert_conv_close(out, reference(x, w, b, **args), dtype)
    expected_format = torch.channels_last if layout == "channels_last" and x.size(0) > 0 else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_geometries(dtype):
    fresh_seed()
    for _ in range(25):
        case = random_case()
        layout = random.choice(LAYOUTS)
        act = random.choice(ACTS)
        x, w, b, args = make_case(case, dtype, layout=layout, bias=random.random() < 0.7)
        out = fastdl.ops.conv2d(x, w, b, activation=act, **args)
        print(case, layout, act)  # shown on failure
        pre = reference(x, w, b, **args)
        assert_conv_close(out, ACTIVATIONS[act](pre), dtype, pre_activation=pre)


# Few input or output channels and an NCHW output: the CPU's row tiles, one vector of output pixels
# of a row (16 with AVX-512, 8 with AVX2) per accumulator, 4 output channels per tile, the input
# split into stride_w column phases; a call sweeps 96 pixels.
ROW_TILE_CASES = {
    "row_of_16": (2, 3, 16, 16, 8, (3, 3), 1, 1, 1, 1),  # whole vectors, none partial
    "row_of_17": (2, 1, 17, 17, 5, (3, 3), 1, 1, 1, 1),  # a 1-lane tail vector, K % 4 == 1
    "row_of_13": (2, 3, 13, 13, 6, (3, 3), 1, 1, 1, 1),  # AVX2: one whole vector and a 5-lane tail
    "row_of_101": (1, 2, 5, 101, 7, (3, 3), 1, 1, 1, 1),  # one row longer than a sweep
    "row_of_33_stride2": (1, 3, 71, 66, 6, (7, 7), 2, 3, 1, 1),  # odd padding: phases swap
    "stride3_even_padding": (2, 2, 20, 50, 7, (4, 5), 3, 2, 1, 1),
    "stride_2x1_dilated": (2, 4, 19, 37, 3, (3, 3), (2, 1), 2, 2, 1),
    "dilation_w_with_stride_w": (1, 2, 12, 45, 9, (2, 3), (1, 2), (0, 3), (1, 3), 1),
    "eight_channels": (1, 8, 9, 40, 12, (3, 3), 1, 1, 1, 1),  # the largest C they take
    "nine_channels": (1, 9, 9, 40, 12, (3, 3), 1, 1, 1, 1),  # the direct tiles again
    "mnist_5x5": (3, 1, 28, 28, 32, (5, 5), 1, 2, 1, 1),
    "few_output_channels": (2, 24, 20, 35, 3, (3, 3), 1, 1, 1, 1),  # K <= 8 takes them too
}


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(ROW_TILE_CASES))
def test_few_input_channels(name, layout, activation):
    fresh_seed()
    x, w, b, args = make_case(ROW_TILE_CASES[name], layout=layout)
    out = fastdl.ops.conv2d(x, w, b, activation=activation, **args)
    pre = reference(x, w, b, **args)
    assert_conv_close(out, ACTIVATIONS[activation](pre), pre_activation=pre)


FEW_CHANNEL_GRADIENT_CASES = [name for name in ROW_TILE_CASES if name != "nine_channels"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FEW_CHANNEL_GRADIENT_CASES)
def test_few_channel_gradients_float32(name, layout):
    """float32 gradients of input, weight and bias against float64, with a random grad_output
    (so every output channel's gradient differs): the weight gradient's row tiles for C <= 8,
    and grad_input through the forward's row tiles wherever it has few channels."""
    fresh_seed()
    x, w, b, args = make_case(ROW_TILE_CASES[name], layout=layout)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    out = fastdl.ops.conv2d(*inputs, **args)
    grad = with_layout(torch.randn(out.shape), layout)
    ours = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*ref_inputs, **args), ref_inputs, grad.double())
    for a, e in zip(ours, expected):
        # float32 sums of many terms that cancel: the error scales with the largest gradient
        assert_close(a, e, rtol=1e-4, atol=2e-5 * (1 + e.abs().max().item()))


def test_cifar_first_layer_backward():
    """The first layer of a CIFAR network (3 -> 64 channels on 32x32): on a CPU without AVX2 its weight
    gradient takes the shifted-GEMM path, whose NCHW -> NHWC copy once ran an AVX-512 transpose
    unchecked and died with SIGILL on AVX2 CPUs (the fixture runs it on every capability)."""
    fresh_seed()
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(64, 3, 3, 3, requires_grad=True)
    fastdl.ops.conv2d(x, w, padding=1).sum().backward()
    w64 = w.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, padding=1).sum().backward()
    assert_close(w.grad, w64.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels", [1, 3, 4, 16])
def test_gradients_are_laid_out_as_the_fake_kernel_says(channels):
    """The eager gradients have the strides the fake kernel promises (a 3-channel weight gradient
    once came back as a strided view, which broke compiled training of RGB networks)."""
    fresh_seed()
    x = torch.randn(2, channels, 12, 12, requires_grad=True)
    w = torch.randn(8, channels, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)
    fastdl.ops.conv2d(x, w, b, padding=1).sum().backward()
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    grad_output, x_fake, w_fake = (mode.from_tensor(t) for t in (torch.ones(2, 8, 12, 12), x.detach(), w.detach()))
    with mode:
        fake = torch.ops.fastdl._conv2d_backward.default(
            grad_output, x_fake, w_fake, [1, 1], [1, 1], [1, 1], 1, [True, True, True]
        )

    def layout(t):  # the strides that matter: those of dimensions longer than 1
        return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)

    for eager, promised in zip((x.grad, w.grad, b.grad), fake):
        assert layout(eager) == layout(promised), (eager.shape, eager.stride(), promised.stride())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel, size", [((1, 1), 6), ((3, 3), 1), ((1, 3), 5)])
def test_gradients_have_their_parameters_strides(kernel, size, layout):
    """Even along size-1 dimensions (a 1x1 weight, a 1x1 map): DDP buckets gradients by the
    parameters' strides and warns, and copies, when they differ."""
    fresh_seed()
    x = with_layout(torch.randn(2, 16, size, size), layout).requires_grad_()
    w = torch.randn(8, 16, *kernel, requires_grad=True)
    padding = (kernel[0] // 2, kernel[1] // 2)
    fastdl.ops.conv2d(x, w, None, padding=padding).sum().backward()
    assert w.grad.stride() == w.stride()
    assert x.grad.stride() == torch.empty_like(x).stride()


def test_few_input_channels_strided_view():
    """An input whose columns are not adjacent (every other one of a wider image)."""
    fresh_seed()
    x = torch.randn(2, 3, 30, 90)[..., ::2]
    w, b = torch.randn(10, 3, 5, 5), torch.randn(10)
    for stride in (1, 2, 3):
        out = fastdl.ops.conv2d(x, w, b, stride=stride, padding=2, activation="relu")
        pre = reference(x, w, b, stride, 2, 1, 1)
        assert_conv_close(out, pre.relu(), pre_activation=pre)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["wide_channels", "3x3_winograd", "3x3_winograd_few_tiles"])
def test_fused_activation(name, activation, layout):
    fresh_seed()
    x, w, b, args = make_case(CASES[name], layout=layout)
    x = x * 3  # outputs well past relu6's 6 and deep into silu/gelu's tails
    out = fastdl.ops.conv2d(x, w, b, activation=activation, **args)
    pre = reference(x, w, b, **args)
    assert_conv_close(out, ACTIVATIONS[activation](pre), pre_activation=pre)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("name", ["wide_channels", "3x3_winograd"])
def test_fused_activation_of_non_finite_sums(name, activation):
    """A bias of +inf, -inf and NaN makes those channels' sums non-finite: the activation sees
    them after the kernels' vector exp2, which must saturate (silu(inf) = inf, gelu(-inf) = -0),
    not turn them into NaN."""
    fresh_seed()
    x, w, b, args = make_case(CASES[name], layout="channels_last")
    b = b.clone()
    b[:3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    out = fastdl.ops.conv2d(x, w, b, activation=activation, **args)
    expected = ACTIVATIONS[activation](reference(x, w, b, **args))
    torch.testing.assert_close(out[:, :3], expected[:, :3].float(), equal_nan=True)


# ---- the residual epilogue: act(conv + bias + residual) ------------------------------------------

# One case per CPU algorithm: direct tiles (full and partial channel blocks), row tiles, Winograd
# (both schedules), the subsampled strided 1x1, grouped (GEMM), no output pixels.
RESIDUAL_CASES = {
    name: CASES[name]
    for name in (
        "3x3",
        "wide_channels",
        "3x3_winograd",
        "3x3_winograd_few_tiles",
        "1x1_stride2_downsample",
        "grouped",
        "batch_0",
    )
} | {name: ROW_TILE_CASES[name] for name in ("row_of_17", "few_output_channels")}


def make_residual(x, w, args, layout, dtype=None):
    shape = reference(x, w, None, **args).shape
    return with_layout(torch.randn(shape, dtype=dtype or x.dtype, device=x.device), layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual_layout", LAYOUTS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("name", list(RESIDUAL_CASES))
def test_residual_matches_reference(name, activation, layout, residual_layout, dtype, device):
    fresh_seed()
    x, w, b, args = make_case(RESIDUAL_CASES[name], dtype, device, layout)
    residual = make_residual(x, w, args, residual_layout)
    out = fastdl.ops.conv2d(x, w, b, activation=activation, residual=residual, **args)
    pre = reference(x, w, b, **args) + residual.double()
    assert_conv_close(out, ACTIVATIONS[activation](pre), dtype, pre_activation=pre)
    assert out.is_contiguous(memory_format=suggest_memory_format(x))


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["3x3", "3x3_winograd", "row_of_17"])
def test_residual_gradients(name, layout, activation):
    fresh_seed()
    case = RESIDUAL_CASES[name]
    x, w, b, args = make_case(case, layout=layout)
    residual = make_residual(x, w, args, layout)
    inputs = [t.requires_grad_() for t in (x, w, b, residual)]
    out = fastdl.ops.conv2d(*inputs[:3], activation=activation, residual=inputs[3], **args)
    grad = torch.randn_like(out)
    actual = torch.autograd.grad(out, inputs, grad)
    doubles = [t.detach().double().requires_grad_() for t in inputs]
    expected_out = ACTIVATIONS[activation](reference(*doubles[:3], **args) + doubles[3])
    expected = torch.autograd.grad(expected_out, doubles, grad.double())
    for a, e in zip(actual, expected):
        assert_conv_close(a, e)


@pytest.mark.parametrize("activation", [None, "relu6", "gelu"])
def test_residual_gradcheck(activation):
    fresh_seed()
    x, w, b, _ = make_case((1, 3, 5, 6, 4, (3, 2), (2, 1), 1, (1, 2), 1), torch.float64)
    residual = torch.randn(1, 4, 3, 6, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, b, residual)]
    op = torch.ops.fastdl.conv2d.default
    assert torch.autograd.gradcheck(
        lambda x, w, b, r: op(x, w, b, [2, 1], [1, 1], [1, 2], 1, activation, None, r), inputs, nondet_tol=1e-12
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_residual_opcheck_and_compile(layout, device):
    fresh_seed()
    x, w, b, _ = make_case((2, 4, 7, 6, 5, (3, 3), 1, 1, 1, 1), device=device, layout=layout)
    residual = with_layout(torch.randn(2, 5, 4, 4, device=device), layout)
    args = ([2, 1], [1, 0], [1, 1], 1, "relu", None)
    run_opcheck(
        torch.ops.fastdl.conv2d.default, (x.requires_grad_(), w.requires_grad_(), b, *args, residual.requires_grad_())
    )
    fn = lambda x, w, b, r: fastdl.ops.conv2d(x, w, b, stride=(2, 1), padding=(1, 0), activation="relu", residual=r)  # noqa: E731
    check_compiled(fn, x, w, b.requires_grad_(), residual)


def test_residual_composite_matches_native():
    fresh_seed()
    x, w, b, _ = make_case(CASES["grouped"], layout="channels_last")
    residual = torch.randn(2, 12, 9, 9)
    params = ([1, 1], [1, 1], [1, 1], 4, "relu", None, residual)
    native = torch.ops.fastdl.conv2d.default(x, w, b, *params)
    assert_conv_close(_library.composite("conv2d")(x, w, b, *params), native.double())


def test_residual_without_input_channels():
    x, w, b = torch.randn(2, 0, 5, 5), torch.randn(3, 0, 3, 3), torch.randn(3)
    residual = torch.randn(2, 3, 3, 3)
    out = fastdl.ops.conv2d(x, w, b, activation="relu", residual=residual)
    assert_close(out, F.relu(b.view(1, -1, 1, 1) + residual))


@pytest.mark.parametrize("impl", ["native", "composite"])
def test_bad_residual(impl):
    op = torch.ops.fastdl.conv2d.default if impl == "native" else _library.composite("conv2d")
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], 1, "relu", None)
    with pytest.raises(RuntimeError, match=r"residual must have the output's shape \[2, 6, 8, 8\], got \[2, 6, 8\]"):
        op(x, w, None, *args, torch.randn(2, 6, 8))
    with pytest.raises(RuntimeError, match=r"output's shape \[2, 6, 8, 8\], got \[1, 6, 8, 8\]"):
        op(x, w, None, *args, torch.randn(1, 6, 8, 8))  # no broadcasting
    with pytest.raises(
        RuntimeError, match="input has dtype .*(Float|float32) but residual has dtype .*(Double|float64)"
    ):
        op(x, w, None, *args, torch.randn(2, 6, 8, 8, dtype=torch.float64))


def test_conv2d_module_takes_a_residual():
    fresh_seed()
    conv = fastdl.nn.Conv2d(4, 6, 3, padding=1, activation="relu")
    x, residual = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    expected = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1) + residual)
    assert_conv_close(conv(x, residual=residual), expected.detach().double())
    assert_conv_close(conv(x), F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)).detach().double())


def test_padded_input_beyond_kept_scratch():
    """A padded input over the 32 MB a thread keeps between calls gets a buffer of its own."""
    fresh_seed()
    x, w, b, args = make_case((1, 64, 380, 380, 32, (1, 1), 1, 1, 1, 1))
    assert (380 + 2) ** 2 * 64 * 4 > 32 << 20
    out = fastdl.ops.conv2d(x, w, b, **args)
    assert_conv_close(out, reference(x, w, b, **args))


# ---- prepacked Winograd weights ---------------------------------------------------------------


def winograd_reference(weight):
    """U[4i + j, c, k] = (G w[k, c] G^T)[i, j], written out filter by filter in float64."""
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    k, c = weight.shape[:2]
    u = torch.empty(16, c, k, dtype=torch.float64)
    for kk in range(k):
        for cc in range(c):
            u[:, cc, kk] = (g @ weight[kk, cc].double() @ g.T).flatten()
    return u


def test_winograd_weight_is_the_filter_transform():
    fresh_seed()
    w = torch.randn(5, 3, 3, 3)
    u = fastdl.ops.conv2d_winograd_weight(w)
    assert u.shape == (16, 3, 5) and u.dtype == torch.float32 and u.is_contiguous()
    assert_close(u, winograd_reference(w), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"Tensor\[K, C, 3, 3\]"):
        fastdl.ops.conv2d_winograd_weight(torch.randn(5, 3, 5, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["3x3_winograd", "3x3_winograd_few_tiles", "3x3", "dilated"])
def test_prepacked_winograd_weight(name, layout, dtype):
    """A prepacked transform gives the same result, and is ignored where Winograd does not run
    (too few channels for "3x3", dilation 2 for "dilated")."""
    fresh_seed()
    x, w, b, args = make_case(CASES[name], dtype, layout=layout)
    u = fastdl.ops.conv2d_winograd_weight(w)
    out = fastdl.ops.conv2d(x, w, b, activation="relu", winograd_weight=u, **args)
    assert_conv_close(
        out, reference(x, w, b, activation="relu", **args), dtype, pre_activation=reference(x, w, b, **args)
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_prepacked_winograd_weight_is_used(layout):
    """With an all-zero transform the Winograd kernel's products vanish: only the bias is left,
    so the kernel really multiplies by the given tensor rather than transforming ``weight``."""
    if fastdl.backends.cpu.get_cpu_capability() == "default":
        pytest.skip("the Winograd kernel needs AVX2 or AVX-512; the other paths ignore winograd_weight")
    fresh_seed()
    x, w, b, args = make_case(CASES["3x3_winograd"], layout=layout)
    out = fastdl.ops.conv2d(x, w, b, winograd_weight=torch.zeros(16, w.size(1), w.size(0)), **args)
    assert torch.equal(out, b.reshape(1, -1, 1, 1).expand_as(out))


@pytest.mark.parametrize("impl", ["native", "composite"])
def test_bad_winograd_weight(impl):
    op = torch.ops.fastdl.conv2d.default if impl == "native" else _library.composite("conv2d")
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    u = fastdl.ops.conv2d_winograd_weight(w)
    one, zero = [1, 1], [0, 0]
    with pytest.raises(RuntimeError, match=r"winograd_weight to be a Tensor\[16, 4, 6\].*got shape \[?\(?16, 6, 4"):
        op(x, w, None, one, zero, one, 1, None, u.transpose(1, 2))
    with pytest.raises(RuntimeError, match="winograd_weight must be float32"):
        op(x, w, None, one, zero, one, 1, None, u.double())
    with pytest.raises(RuntimeError, match="only for 3x3 convolutions with groups=1"):
        op(x, torch.randn(6, 4, 1, 1), None, one, zero, one, 1, None, u)
    with pytest.raises(RuntimeError, match="only for 3x3 convolutions with groups=1"):
        op(x, torch.randn(6, 2, 3, 3), None, one, zero, one, 2, None, u)


def test_opcheck_with_winograd_weight():
    fresh_seed()
    x, w, b, _ = make_case((2, 4, 7, 6, 5, (3, 3), 1, 1, 1, 1))
    u = fastdl.ops.conv2d_winograd_weight(w)
    run_opcheck(
        torch.ops.fastdl.conv2d.default,
        (x.requires_grad_(), w.requires_grad_(), b, [1, 1], [1, 1], [1, 1], 1, "relu", u),
    )


def test_conv2d_module_prepack_follows_the_weight():
    fresh_seed()
    conv = fastdl.nn.Conv2d(40, 48, 3, padding=1).eval()
    assert conv.prepack() is conv and conv.prepacked
    x = torch.randn(2, 40, 16, 16)
    expected = lambda: F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)  # noqa: E731
    with torch.no_grad():
        assert_conv_close(conv(x), expected())
        assert conv._winograd is not None  # the transform is kept...
        conv.load_state_dict(fastdl.nn.Conv2d(40, 48, 3, padding=1).state_dict())  # ...and follows new weights
        assert_conv_close(conv(x), expected())
        conv.weight.mul_(-2)  # an in-place change
        assert_conv_close(conv(x), expected())
        conv.weight.data.copy_(torch.randn_like(conv.weight))  # unseen until prepack() again
        assert_conv_close(conv.prepack()(x), expected())
    conv.train()  # training calls transform the (changing) weights themselves
    out = conv(x)
    assert_conv_close(out, expected())
    out.sum().backward()
    assert conv.weight.grad is not None


def test_fuse_conv_bn_prepacks_and_compiles():
    fresh_seed()
    conv, bn = nn.Conv2d(32, 40, 3, padding=1, bias=False), trained_batchnorm(40)
    fused = fastdl.nn.fuse_conv_bn(conv, bn, "relu")
    assert fused.prepacked and not fused.training
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        expected = F.relu(bn(conv(x)))
        assert_conv_close(fused(x), expected.double())
        assert fused._winograd is not None
        compiled = torch.compile(fused, fullgraph=True, dynamic=False)
        assert_conv_close(compiled(x), expected.double())


def test_bfloat16_on_cpu():
    fresh_seed()
    x, w, b, args = make_case(CASES["3x3"], torch.bfloat16)
    out = fastdl.ops.conv2d(x, w, b, activation="relu", **args)
    assert out.dtype == torch.bfloat16
    assert_conv_close(out, reference(x, w, b, activation="relu", **args), torch.bfloat16)
    x.requires_grad_()
    fastdl.ops.conv2d(x, w, b, **args).sum().backward()
    assert x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel", [(3, 3), (4, 2), (2, 5)])
def test_string_padding(padding, kernel):
    fresh_seed()
    x = torch.randn(2, 3, 9, 11)
    conv = nn.Conv2d(3, 5, kernel, padding=padding, dilation=(1, 2))
    ours = fastdl.ops.conv2d(x, conv.weight, conv.bias, padding=padding, dilation=(1, 2))
    assert_conv_close(ours, conv(x).double())


# ---- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "name",
    [
        "3x3",
        "7x7_stride2_stem",
        "non_square_3x5",
        "dilated",
        "grouped",
        "depthwise",
        "1x1_pointwise",
        "smaller_than_kernel_padded",
        "batch_0",
    ],
)
def test_gradients_match_reference(name, layout, activation):
    fresh_seed()
    x, w, b, args = make_case(CASES[name], torch.float64, layout=layout)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    out = fastdl.ops.conv2d(*inputs, activation=activation, **args)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*ref_inputs, activation=activation, **args), ref_inputs, grad)
    for a, e in zip(ours, expected):
        assert_close(a, e)
    if layout == "channels_last" and x.size(0) > 0:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "name", ["wide_channels", "3x3_winograd", "7x7_stride2_stem", "large_map_dilated", "large_map_one_image"]
)
def test_gradients_float32_and_partial(name, layout):
    fresh_seed()
    x, w, b, args = make_case(CASES[name], layout=layout)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(fastdl.ops.conv2d(x, w, b, activation="relu", **args).square().sum(), [x])
    xr = x.detach().double().requires_grad_()
    (ex,) = torch.autograd.grad(reference(xr, w, b, activation="relu", **args).square().sum(), [xr])
    # float32 sums of many terms that cancel: the error scales with the largest gradient
    assert_close(gx, ex, rtol=1e-4, atol=2e-5 * ex.abs().max().item())
    w.requires_grad_()  # weight only, no bias gradient wanted
    (gw,) = torch.autograd.grad(fastdl.ops.conv2d(x.detach(), w, b, **args).sum(), [w])
    wr = w.detach().double().requires_grad_()
    (ew,) = torch.autograd.grad(reference(x.detach(), wr, b, **args).sum(), [wr])
    assert_close(gw, ew, rtol=1e-4, atol=2e-5 * ew.abs().max().item())


@pytest.mark.parametrize("name", ["3x3", "7x7_stride2_stem", "dilated", "grouped", "non_square_3x5"])
def test_weight_gradient_is_window_sum(name):
    """With loss = out.sum(), dW[k, c, r, s] is the sum of every input value tap (r, s) reads."""
    fresh_seed()
    x, w, _, args = make_case(CASES[name], torch.float64, bias=False)
    w.requires_grad_()
    fastdl.ops.conv2d(x, w, None, **args).sum().backward()
    sh, sw = (args["stride"],) * 2 if isinstance(args["stride"], int) else args["stride"]
    ph, pw = (args["padding"],) * 2 if isinstance(args["padding"], int) else args["padding"]
    dh, dw = (args["dilation"],) * 2 if isinstance(args["dilation"], int) else args["dilation"]
    groups, (k, cg, kh, kw) = args["groups"], w.shape
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h = (padded.size(2) - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.size(3) - dw * (kw - 1) - 1) // sw + 1
    expected = torch.zeros_like(w)
    for out_channel in range(k):
        group = out_channel // (k // groups)
        for r in range(kh):
            for s in range(kw):
                rows = padded[:, group * cg : (group + 1) * cg, r * dh : r * dh + sh * (out_h - 1) + 1 : sh]
                window = rows[..., s * dw : s * dw + sw * (out_w - 1) + 1 : sw]
                expected[out_channel, :, r, s] = window.sum(dim=(0, 2, 3))
    assert_close(w.grad, expected)


@pytest.mark.parametrize("activation", [None, "silu", "gelu", "relu6"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(activation, layout):
    fresh_seed()
    x, w, b, args = make_case((1, 3, 5, 6, 4, (3, 2), (2, 1), 1, (1, 2), 1), torch.float64, layout=layout)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    op = torch.ops.fastdl.conv2d.default  # the op itself, so the registered autograd formula runs
    assert torch.autograd.gradcheck(lambda *t: op(*t, [2, 1], [1, 1], [1, 2], 1, activation), inputs, nondet_tol=1e-12)


# ---- dispatcher-level checks ------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout, activation, device):
    fresh_seed()
    x, w, b, _ = make_case((2, 4, 7, 6, 5, (3, 3), 1, 1, 1, 1), device=device, layout=layout)
    run_opcheck(
        torch.ops.fastdl.conv2d.default,
        (x.requires_grad_(), w.requires_grad_(), b, [2, 1], [1, 0], [1, 1], 1, activation),
    )
    grad = torch.randn(2, 5, 4, 4, device=device)
    run_opcheck(
        torch.ops.fastdl._conv2d_backward.default,
        (grad, x.detach(), w.detach(), [2, 1], [1, 0], [1, 1], 1, [True, True, False]),
    )


def test_torch_compile():
    fresh_seed()
    x, w, b, _ = make_case((2, 4, 9, 9, 6, (3, 3), 1, 1, 1, 1), layout="channels_last")
    fn = lambda x, w, b: fastdl.ops.conv2d(x, w, b, stride=2, padding=1, activation="relu")  # noqa: E731
    check_compiled(fn, x.requires_grad_(), w.requires_grad_(), b.requires_grad_())


def test_composite_matches_and_serves_mps():
    fresh_seed()
    x, w, b, _ = make_case(CASES["grouped"], layout="channels_last")
    composite = _library.composite("conv2d")
    native = fastdl.ops.conv2d(x, w, b, 1, 1, 1, 4, "silu")
    assert_conv_close(composite(x, w, b, [1, 1], [1, 1], [1, 1], 4, "silu"), native.double())
    grad = torch.randn_like(native)
    back = _library.composite("_conv2d_backward")(grad, x, w, [1, 1], [1, 1], [1, 1], 4, [True, True, True])
    native_back = torch.ops.fastdl._conv2d_backward(grad, x, w, [1, 1], [1, 1], [1, 1], 4, [True, True, True])
    for a, e in zip(back, native_back):
        assert_conv_close(a, e.double())
    assert composite_serves_mps("conv2d") and composite_serves_mps("_conv2d_backward")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_resnet_block_shapes(layout, dtype):
    fresh_seed()
    for case in [
        (8, 64, 56, 56, 64, (3, 3), 1, 1, 1, 1),
        (8, 3, 224, 224, 64, (7, 7), 2, 3, 1, 1),
        (8, 64, 56, 56, 128, (1, 1), 2, 0, 1, 1),
    ]:
        x, w, b, args = make_case(case, dtype, "cuda", layout)
        out = fastdl.ops.conv2d(x, w, b, activation="relu", **args)
        tol = dict(rtol=1e-3, atol=1e-2) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)
        assert_close(out, reference(x, w, b, activation="relu", **args).cuda(), **tol)
        residual = make_residual(x, w, args, layout)
        out = fastdl.ops.conv2d(x, w, b, activation="relu", residual=residual, **args)
        assert_close(out, F.relu(reference(x, w, b, **args).cuda() + residual.double()), **tol)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["native", "composite"])
def test_bad_input(impl):
    op = torch.ops.fastdl.conv2d.default if impl == "native" else _library.composite("conv2d")
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    one, zero = [1, 1], [0, 0]
    with pytest.raises(RuntimeError, match="4-D tensor"):
        op(x[0], w, None, one, zero, one, 1, None)
    with pytest.raises(RuntimeError, match="input has 4 channels but weight"):
        op(x, torch.randn(6, 3, 3, 3), None, one, zero, one, 1, None)
    with pytest.raises(RuntimeError, match="groups=3 must divide the input channels"):
        op(x, w, None, one, zero, one, 3, None)
    with pytest.raises(RuntimeError, match="groups=4 must divide the output channels"):
        op(x, torch.randn(6, 1, 3, 3), None, one, zero, one, 4, None)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        op(x, w, None, [0, 1], zero, one, 1, None)
    with pytest.raises(RuntimeError, match="padding must be non-negative"):
        op(x, w, None, one, [-1, 0], one, 1, None)
    with pytest.raises(RuntimeError, match="dilation must be positive"):
        op(x, w, None, one, zero, [1, 0], 1, None)
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        op(torch.randn(1, 4, 2, 8), w, None, one, zero, one, 1, None)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, w.double(), None, one, zero, one, 1, None)
    with pytest.raises(RuntimeError, match="bias"):
        op(x, w, torch.randn(5), one, zero, one, 1, None)
    with pytest.raises((RuntimeError, ValueError), match="unknown activation"):
        op(x, w, None, one, zero, one, 1, "tanh")


def test_bad_wrapper_arguments():
    x, w = torch.randn(1, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="stride 1"):
        fastdl.ops.conv2d(x, w, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding must be"):
        fastdl.ops.conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        fastdl.ops.conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        fastdl.ops.conv2d(x, w, activation="tanh")


# ---- modules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_is_drop_in(padding_mode):
    fresh_seed()
    ref = nn.Conv2d(6, 9, (3, 5), stride=(1, 2), padding=(1, 2), groups=3, padding_mode=padding_mode)
    ours = fastdl.nn.Conv2d(6, 9, (3, 5), stride=(1, 2), padding=(1, 2), groups=3, padding_mode=padding_mode)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 6, 10, 11)
    assert_conv_close(ours(x), ref(x).double())
    ref.load_state_dict(ours.state_dict())


def test_conv2d_module_activation_and_training_step():
    fresh_seed()
    conv = fastdl.nn.Conv2d(3, 8, 3, padding="same", activation="silu")
    ref = nn.Conv2d(3, 8, 3, padding="same")
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(4, 3, 12, 12)
    out, expected = conv(x), F.silu(ref(x))
    assert_conv_close(out, expected.double())
    out.square().mean().backward()
    expected.square().mean().backward()
    assert_close(conv.weight.grad, ref.weight.grad.double(), rtol=1e-4, atol=1e-5)
    assert_close(conv.bias.grad, ref.bias.grad.double(), rtol=1e-4, atol=1e-5)
    assert "activation='silu'" in repr(conv)


def trained_batchnorm(channels):
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn.eval()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_fuse_conv_bn_equals_conv_bn_act(activation, bias):
    fresh_seed()
    conv, bn = nn.Conv2d(5, 12, 3, stride=2, padding=1, bias=bias), trained_batchnorm(12)
    fused = fastdl.nn.fuse_conv_bn(conv, bn, activation)
    x = torch.randn(3, 5, 13, 9)
    with torch.no_grad():
        assert_conv_close(fused(x), ACTIVATIONS[activation](bn(conv(x))).double())


def test_conv2d_norm_activation_train_and_eval():
    fresh_seed()
    block = fastdl.nn.Conv2dNormActivation(4, 8, 3, stride=2)
    assert {"0.weight", "1.weight", "1.running_mean"} <= set(block.state_dict())
    x = torch.randn(6, 4, 11, 11)
    block.train()
    out = block(x)  # batch statistics, and the running statistics move
    expected = F.relu(
        F.batch_norm(F.conv2d(x, block[0].weight, None, 2, 1), None, None, block[1].weight, block[1].bias, True)
    )
    assert_conv_close(out, expected.double())
    out.sum().backward()
    assert block[0].weight.grad is not None
    block.eval()
    with torch.no_grad():
        unfused = F.relu(block[1](block[0](x)))
        assert_conv_close(block(x), unfused.double())
        assert block._fused is not None  # the fused path ran
        block[1].running_mean.add_(1.0)  # an updated statistic invalidates the cached folding
        unfused = F.relu(block[1](block[0](x)))
        assert_conv_close(block(x), unfused.double())
        block[1].running_var.data.mul_(2)  # unseen by the cache until refresh()
        unfused = F.relu(block[1](block[0](x)))
        assert_conv_close(block.refresh()(x), unfused.double())


def test_conv2d_norm_activation_eval_with_winograd():
    """A 3x3 stride-1 block's cached folding also keeps the Winograd transform."""
    fresh_seed()
    block = fastdl.nn.Conv2dNormActivation(32, 48, 3, activation_layer=nn.SiLU)
    block[1].load_state_dict(trained_batchnorm(48).state_dict())
    block.eval()
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        assert_conv_close(block(x), F.silu(block[1](block[0](x))).double())
        assert block._fused[3] is not None
        block[0].weight.add_(0.5)
        assert_conv_close(block(x), F.silu(block[1](block[0](x))).double())


def _torchvision_style_block(*args, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, **kwargs):
    """The layers torchvision's ``Conv2dNormActivation`` builds, from its documented defaults:
    padding ``(k - 1) // 2 * dilation``, a conv bias only without a norm layer."""
    in_channels, out_channels, kernel_size = args
    stride, groups, dilation = kwargs.get("stride", 1), kwargs.get("groups", 1), kwargs.get("dilation", 1)
    layers = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            (kernel_size - 1) // 2 * dilation,
            dilation,
            groups,
            bias=norm_layer is None,
        )
    ]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    if activation_layer is not None:
        layers.append(activation_layer(inplace=True))
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(stride=2, dilation=1),
        dict(dilation=2),
        dict(groups=2, activation_layer=nn.ReLU6),
        dict(activation_layer=nn.SiLU),
        dict(activation_layer=nn.Hardswish),  # not fusable: runs as separate modules
        dict(norm_layer=None),
        dict(activation_layer=None),
    ],
    ids=["defaults", "stride2", "dilation2", "groups-relu6", "silu", "hardswish", "no-norm", "no-activation"],
)
def test_conv2d_norm_activation_swaps_for_the_reference(config):
    """Same keys as the reference block; with its state_dict, outputs and gradients match in
    training and the (fused) eval outputs match too."""
    fresh_seed()
    reference = _torchvision_style_block(8, 12, 3, **config)
    block = fastdl.nn.Conv2dNormActivation(8, 12, 3, **config)
    assert list(block.state_dict()) == list(reference.state_dict())
    if len(reference) > 1 and isinstance(reference[1], nn.BatchNorm2d):
        reference[1].load_state_dict(trained_batchnorm(12).state_dict())
    block.load_state_dict(reference.state_dict())
    block.train(), reference.train()
    x = torch.randn(3, 8, 10, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = block(x), reference(x_ref)
    assert_conv_close(out, expected.double())
    out.square().sum().backward()
    expected.square().sum().backward()
    assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    for p, q in zip(block.parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-3)
    block.eval(), reference.eval()
    with torch.no_grad():
        assert_conv_close(block(x), reference(x).double())


def test_fuse_conv_bn_rejects_mismatch():
    with pytest.raises(ValueError, match="output channels"):
        fastdl.nn.fuse_conv_bn(nn.Conv2d(3, 4, 3), trained_batchnorm(5))


@pytest.mark.parametrize("impl", ["native", "composite"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_no_input_channels_gives_the_activated_bias(impl, activation):
    """With zero input channels every sum is empty: the output is act(bias), defined, never the
    uninitialised memory a BLAS call with an empty reduction left (F.conv2d itself returns a
    tensor with no output channels here)."""
    fresh_seed()
    x, w = torch.randn(2, 0, 5, 6), torch.randn(4, 0, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    args = ([1, 1], [1, 1], [1, 1], 1, activation, None)
    op = torch.ops.fastdl.conv2d.default if impl == "native" else _library.composite("conv2d")
    out = op(x, w, b, *args)
    expected = ACTIVATIONS[activation](b.detach().view(1, 4, 1, 1).expand(2, 4, 5, 6))
    assert_close(out.detach(), expected, rtol=1e-6, atol=1e-7)
    if impl == "native":
        out.sum().backward()
        assert w.grad.shape == (4, 0, 3, 3)
        assert_close(
            b.grad, torch.autograd.grad(ACTIVATIONS[activation](b.view(1, 4, 1, 1).expand(2, 4, 5, 6)).sum(), b)[0]
        )
