"""The Triton conv2d kernels (fastdl.kernels.conv2d) against float64 ``F.conv2d``.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET
before anything imports them) on CPU tensors, so the sizes here are small. Only the kernels module
is imported at the top (not fastdl.ops, whose extension may be rebuilding); the checks marked
``cuda`` go through the registered op at realistic sizes on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from harness import fresh_seed, require_triton

triton = require_triton("conv2d")

from fastdl.kernels import conv2d as triton_conv2d  # noqa: E402

FORWARD = triton_conv2d.conv2d_forward_op
BACKWARD = triton_conv2d.conv2d_backward_op
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}

ACTIVATIONS = {
    None: lambda y: y,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
}


@pytest.fixture
def gen():
    """A generator with a fresh seed each run, printed (shown on failure)."""
    return torch.Generator().manual_seed(fresh_seed())


def make_inputs(gen, n, c, h, w, k, kh, kw, groups=1, bias=True, dtype=torch.float32):
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c // groups, kh, kw, generator=gen) / (c // groups * kh * kw) ** 0.5
    b = torch.randn(k, generator=gen) if bias else None
    return [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in (x, weight, b)]


def as_pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def reference(x, weight, bias, stride, padding, dilation, groups, activation=None):
    """float64 F.conv2d + activation of the (already rounded) inputs."""
    y = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation, groups
    )
    return ACTIVATIONS[activation](y)


def reference_grads(grad_out, x, weight, stride, padding, dilation, groups):
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    b64 = torch.zeros(weight.size(0), dtype=torch.float64, device=x.device, requires_grad=True)
    y = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    return torch.autograd.grad(y, (x64, w64, b64), grad_out.double())


def assert_close(actual, expected, dtype, name=""):
    assert actual.dtype == dtype, name
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"NaN in {name}"
    torch.testing.assert_close(actual.double(), expected, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def memory_format_of(t):
    return (
        torch.channels_last
        if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        else (torch.contiguous_format)
    )


def expected_format(x):
    """The memory format torch's own conv gives the output for this input (two output channels, so
    that channels_last and contiguous differ)."""
    return memory_format_of(F.conv2d(x.detach().float().cpu(), torch.zeros(2, x.size(1), 1, 1)))


def check(x, weight, bias, stride=1, padding=0, dilation=1, groups=1, activation=None, gen=None, backward=True):
    """Forward (+ activation) and, with ``backward``, all three gradients against float64."""
    stride, padding, dilation = as_pair(stride), as_pair(padding), as_pair(dilation)
    dtype = x.dtype
    out = FORWARD(x, weight, bias, stride, padding, dilation, groups, activation)
    ref = reference(x, weight, bias, stride, padding, dilation, groups, activation)
    assert_close(out, ref, dtype, "out")
    assert out.is_contiguous(memory_format=expected_format(x)), out.stride()
    if not backward:
        return out
    grad_out = torch.randn(ref.shape, generator=gen).to(device=x.device, dtype=dtype)
    grads = BACKWARD(grad_out, x, weight, stride, padding, dilation, groups, [True, True, True])
    ref_grads = reference_grads(grad_out, x, weight, stride, padding, dilation, groups)
    for name, actual, exp in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(actual, exp, dtype, name)
    assert grads[0].is_contiguous(memory_format=expected_format(x)), grads[0].stride()
    assert grads[1].is_contiguous()
    return out, grads


# (N, C, H, W, K, kh, kw, stride, padding, dilation, groups)
CASES = {
    "1x1": (2, 8, 6, 6, 40, 1, 1, 1, 0, 1, 1),  # K = 40: several column tiles
    "3x3": (2, 4, 9, 9, 6, 3, 3, 1, 1, 1, 1),
    "5x5": (1, 3, 10, 10, 5, 5, 5, 1, 2, 1, 1),
    "7x7-stride2": (1, 3, 13, 13, 8, 7, 7, 2, 3, 1, 1),
    "non-square-kernel": (1, 4, 8, 9, 5, 2, 5, 1, (0, 2), 1, 1),
    "stride2": (2, 4, 8, 8, 6, 3, 3, 2, 1, 1, 1),
    "dilation2": (1, 4, 10, 10, 6, 3, 3, 1, 2, 2, 1),
    "mixed-stride-padding-dilation": (1, 3, 9, 11, 4, 3, 2, (2, 1), (1, 0), (1, 3), 1),
    "stride3-no-padding": (1, 3, 11, 10, 4, 3, 3, 3, 0, 1, 1),
    "padding-larger-than-kernel": (1, 3, 5, 5, 4, 3, 3, 1, 4, 1, 1),
    "image-smaller-than-kernel": (1, 3, 2, 3, 4, 5, 5, 1, 2, 1, 1),
    "groups2": (2, 6, 7, 7, 8, 3, 3, 1, 1, 1, 2),
    "depthwise": (2, 8, 7, 7, 8, 3, 3, 1, 1, 1, 8),
    "depthwise-multiplier2-stride2": (1, 4, 9, 9, 8, 3, 3, 2, 1, 1, 4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64(name, gen):
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = CASES[name]
    x, weight, bias = make_inputs(gen, n, c, h, w, k, kh, kw, groups)
    check(x, weight, bias, stride, padding, dilation, groups, gen=gen)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activations(activation, gen):
    x, weight, bias = make_inputs(gen, 1, 4, 7, 7, 6, 3, 3)
    x = x * 4  # reach both sides of relu6's clamp
    check(x, weight, bias, padding=1, activation=activation, backward=False)


@pytest.mark.parametrize("residual_layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_residual(activation, residual_layout, gen):
    """act(conv + bias + residual), the residual read at its own strides."""
    x, weight, bias = make_inputs(gen, 2, 4, 7, 7, 6, 3, 3)
    residual = torch.randn(2, 6, 7, 14, generator=gen).to(DEVICE)
    residual = {
        "contiguous": residual[..., :7].contiguous(),
        "channels_last": residual[..., :7].contiguous(memory_format=torch.channels_last),
        "strided": residual[..., ::2],
    }[residual_layout]
    out = FORWARD(x, weight, bias, (1, 1), (1, 1), (1, 1), 1, activation, residual)
    pre = reference(x, weight, bias, (1, 1), (1, 1), (1, 1), 1) + residual.double()
    assert_close(out, ACTIVATIONS[activation](pre), torch.float32, "out")


def test_without_bias(gen):
    x, weight, _ = make_inputs(gen, 2, 4, 6, 6, 6, 3, 3, bias=False)
    check(x, weight, None, padding=1, activation="relu", gen=gen)


@pytest.mark.parametrize("groups", [1, 4])
def test_channels_last(groups, gen):
    x, weight, bias = make_inputs(gen, 2, 8, 7, 7, 8, 3, 3, groups)
    x = x.contiguous(memory_format=torch.channels_last)
    out, (grad_input, _, _) = check(x, weight, bias, 1, 1, 1, groups, gen=gen)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert grad_input.is_contiguous(memory_format=torch.channels_last) and not grad_input.is_contiguous()


def test_channels_last_weight_and_grad_output(gen):
    x, weight, bias = make_inputs(gen, 2, 4, 7, 7, 6, 3, 3)
    weight = weight.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 6, 4, 4, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    grads = BACKWARD(grad_out, x, weight, (2, 2), (1, 1), (1, 1), 1, [True, True, True])
    ref_grads = reference_grads(grad_out, x, weight, (2, 2), (1, 1), (1, 1), 1)
    for name, actual, exp in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(actual, exp, torch.float32, name)
    assert grads[0].is_contiguous() and grads[1].is_contiguous()


def strided(t):
    """The same values in a non-contiguous tensor: every other element of a wider one."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def test_non_contiguous_inputs(gen):
    x, weight, bias = make_inputs(gen, 2, 4, 7, 6, 6, 3, 3)
    x, weight, bias = strided(x), strided(weight), strided(bias)
    assert not x.is_contiguous() and not weight.is_contiguous() and not bias.is_contiguous()
    out, (grad_input, _, _) = check(x, weight, bias, 1, 1, 1, 1, gen=gen)
    assert out.is_contiguous() and grad_input.is_contiguous()
    # a strided grad_output as well
    grad_out = strided(torch.randn(out.shape, generator=gen).to(DEVICE))
    grads = BACKWARD(grad_out, x, weight, (1, 1), (1, 1), (1, 1), 1, [True, True, True])
    ref_grads = reference_grads(grad_out, x, weight, (1, 1), (1, 1), (1, 1), 1)
    for name, actual, exp in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(actual, exp, torch.float32, name)


def test_channels_last_strided_view_keeps_channels_last(gen):
    x, weight, bias = make_inputs(gen, 1, 4, 6, 12, 5, 3, 3)
    x = x.contiguous(memory_format=torch.channels_last)[..., ::2]
    out, _ = check(x, weight, bias, 1, 1, 1, 1, gen=gen)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as torch's own conv decides


def test_output_memory_format_matches_torch():
    """Every axis permutation of a few shapes, ambiguous ones (size-1 dims, empty) included."""
    for shape in [(2, 3, 4, 5), (0, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 1), (1, 3, 4, 1), (2, 3, 1, 5), (3, 1, 1, 1)]:
        base = torch.randn(shape)
        layouts = [base[..., ::2], base.contiguous(memory_format=torch.channels_last)[..., ::2]]
        for perm in itertools.permutations(range(4)):
            layouts.append(base.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(4)]))
        for x in layouts:
            assert triton_conv2d.output_memory_format(x) == expected_format(x), (x.shape, x.stride())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision(dtype, layout, gen):
    x, weight, bias = make_inputs(gen, 2, 6, 7, 7, 8, 3, 3, groups=2, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    check(x, weight, bias, 2, 1, 1, 2, activation="silu", backward=False)
    check(x, weight, bias, 2, 1, 1, 2, gen=gen)


def test_batch_zero(gen):
    x, weight, bias = make_inputs(gen, 0, 4, 7, 7, 6, 3, 3)
    out = FORWARD(x, weight, bias, (2, 2), (1, 1), (1, 1), 1, "relu")
    assert out.shape == (0, 6, 4, 4) and out.dtype == x.dtype
    grad_input, grad_weight, grad_bias = BACKWARD(out, x, weight, (2, 2), (1, 1), (1, 1), 1, [True, True, True])
    assert grad_input.shape == x.shape
    assert grad_weight.shape == weight.shape and (grad_weight == 0).all()
    assert grad_bias.shape == (6,) and (grad_bias == 0).all()


@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_output_mask(mask, gen):
    x, weight, bias = make_inputs(gen, 1, 4, 6, 6, 6, 3, 3)
    grad_out = torch.randn(1, 6, 6, 6, generator=gen).to(DEVICE)
    grads = BACKWARD(grad_out, x, weight, (1, 1), (1, 1), (1, 1), 1, list(mask))
    ref_grads = reference_grads(grad_out, x, weight, (1, 1), (1, 1), (1, 1), 1)
    for name, wanted, actual, exp in zip(("grad_input", "grad_weight", "grad_bias"), mask, grads, ref_grads):
        if wanted:
            assert_close(actual, exp, torch.float32, name)
        else:
            assert actual.numel() == 0 and actual.dtype == x.dtype, name


def test_weight_gradient_split_covers_every_pixel():
    """The split-K partition of the grad_weight reduction: whole chunks, every pixel exactly once."""
    device = torch.device(DEVICE)
    for pixels in (1, 31, 32, 33, 288, 10_000, 1_000_003):
        for tiles in (1, 3, 1000):
            splits, per_split = triton_conv2d._weight_grad_split(pixels, tiles, device)
            assert splits >= 1 and per_split % triton_conv2d._PIXEL_CHUNK == 0
            assert (splits - 1) * per_split < pixels <= splits * per_split, (pixels, tiles, splits, per_split)


def test_weight_gradient_with_many_splits(gen):
    """Enough pixels that the interpreter's grad_weight splits its reduction several ways."""
    x, weight, bias = make_inputs(gen, 3, 3, 12, 12, 4, 3, 3)
    splits, _ = triton_conv2d._weight_grad_split(3 * 12 * 12, 1, torch.device(DEVICE))
    assert splits > 1
    check(x, weight, bias, 1, 1, 1, 1, gen=gen)


@pytest.mark.parametrize("interpret", [False, True])
def test_tile_configs_are_valid(interpret):
    """Every candidate tile is a power of two >= 16 (tl.dot); the interpreter gets exactly one; the
    pruning keeps at least one tile whatever the GEMM size; grad_weight splits never cut a BK step."""
    configs = triton_conv2d._tile_configs(interpret)
    chunk = 32 if interpret else 512  # _PIXEL_CHUNK in each mode
    assert all(chunk % cfg.kwargs["BK"] == 0 for cfg in configs)
    assert len(configs) == 1 if interpret else len(configs) > 1
    for cfg in configs:
        for block in ("BM", "BN", "BK"):
            size = cfg.kwargs[block]
            assert size >= 16 and size & (size - 1) == 0, cfg
    for rows, cols in ((1, 1), (10, 1), (10_000, 1), (10_000, 64), (100_000, 4096)):
        kept = triton_conv2d._prune_tiles(configs, {"ROWS": rows, "COLS": cols, "RED": 9})
        assert kept and all(c in configs for c in kept)
    if interpret == triton_conv2d._INTERPRET:  # what the kernels were decorated with
        kernels = (
            triton_conv2d._conv_fwd_kernel,
            triton_conv2d._conv_bwd_input_kernel,
            triton_conv2d._conv_bwd_weight_kernel,
        )
        assert all(len(kernel.configs) == len(configs) for kernel in kernels)


# ---- GPU: the registered CUDA op at realistic sizes ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_inputs(n, c, h, w, k, kh, kw, groups, dtype, channels_last):
    gen = torch.Generator().manual_seed(n * 1000 + c + k + kh)
    x = torch.randn(n, c, h, w, generator=gen).to("cuda", dtype)
    weight = (torch.randn(k, c // groups, kh, kw, generator=gen) / (c // groups * kh * kw) ** 0.5).to("cuda", dtype)
    bias = torch.randn(k, generator=gen).to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias


CUDA_CASES = {  # (N, C, H, W, K, kh, kw, stride, padding, dilation, groups)
    "resnet-3x3": (8, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1),
    "stem-7x7-stride2": (4, 3, 224, 224, 64, 7, 7, 2, 3, 1, 1),
    "pointwise": (8, 256, 28, 28, 512, 1, 1, 1, 0, 1, 1),
    "depthwise": (8, 128, 56, 56, 128, 3, 3, 1, 1, 1, 128),
}


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_op_matches_float64(name, dtype, channels_last):
    import fastdl.ops  # noqa: F401  (registers torch.ops.fastdl.*)
    from fastdl.ops import _library

    assert _library.implementation("conv2d", "cuda") == "Triton"
    n, c, h, w, k, kh, kw, stride, padding, dilation, groups = CUDA_CASES[name]
    stride, padding, dilation = as_pair(stride), as_pair(padding), as_pair(dilation)
    x, weight, bias = (t.requires_grad_() for t in _cuda_inputs(n, c, h, w, k, kh, kw, groups, dtype, channels_last))
    out = torch.ops.fastdl.conv2d(x, weight, bias, stride, padding, dilation, groups, "relu")
    ref = reference(x.detach(), weight.detach(), bias.detach(), stride, padding, dilation, groups, "relu")
    # long reductions: the tolerance grows with the reduction length for the 16-bit types
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(TOL[dtype])
    torch.testing.assert_close(out.double(), ref, **tol)
    assert out.is_contiguous(memory_format=expected_format(x))

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    # through the relu, masked where the op's own output is positive (as its backward does), so
    # outputs that round across zero do not count as mismatches
    grad_pre = grad_out.double() * (out.detach() > 0)
    ref_grads = reference_grads(grad_pre, x.detach(), weight.detach(), stride, padding, dilation, groups)
    for name_, actual, exp in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        scale = exp.abs().max().item() or 1.0  # grad_weight/grad_bias sum over many pixels
        torch.testing.assert_close(actual.double() / scale, exp / scale, **tol, msg=lambda m: f"{name_}: {m}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_kernels_direct_float32_grouped_dilated():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 48, 37, 41, generator=gen).cuda()
    weight = torch.randn(96, 16, 3, 5, generator=gen).cuda() / 240**0.5
    bias = torch.randn(96, generator=gen).cuda()
    args = ((2, 1), (2, 3), (2, 2), 3)
    out = FORWARD(x, weight, bias, *args, "gelu")
    torch.testing.assert_close(out.double(), reference(x, weight, bias, *args, "gelu"), atol=1e-4, rtol=1e-4)
    grad_out = torch.randn(out.shape, generator=gen).cuda()
    grads = BACKWARD(grad_out, x, weight, *args, [True, True, True])
    for actual, exp in zip(grads, reference_grads(grad_out, x, weight, *args)):
        torch.testing.assert_close(actual.double(), exp, atol=1e-3, rtol=1e-4)
