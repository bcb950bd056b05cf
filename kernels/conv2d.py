"""Triton kernels for ``fastdl::conv2d`` and ``fastdl::_conv2d_backward`` (CUDA).

Every kernel is an implicit GEMM: the im2col matrix is never built. Each program gathers its
operand tile straight from the 4-d tensor through the tensor's own strides (so NCHW, channels_last
and strided views all work without a copy), with padding and out-of-image taps masked to zero.
All three kernels use the same names for their GEMM view: ``ROWS x COLS`` outputs, reduced over
``RED``, one grid axis per row tile, column tile and group (``g``). With ``Cg = C / groups``,
``Kg = K / groups`` and the tap index ``q = (c, r, s)`` over ``Cg * kh * kw``:

* forward: ``y[m, k] = sum_q A[m, q] * w[k, q]`` with ``m = (n, ho, wo)`` over ``N * Ho * Wo``
  (ROWS), ``k`` over ``Kg`` (COLS), ``q`` over ``Cg * kh * kw`` (RED) and
  ``A[m, q] = x[n, g * Cg + c, ho * sh - ph + r * dh, wo * sw - pw + s * dw]``.
  The epilogue adds the bias and the residual, applies the activation and casts, so ``y`` is
  written once.
* grad_input: ``dx[m, c] = sum_q dY[m, q] * w[q, c]`` with ``m = (n, h, w)`` over ``N * H * W``,
  ``c`` over ``Cg``, ``q = (k, r, s)`` over ``Kg * kh * kw`` and the transposed gather
  ``dY[m, q] = dy[n, g * Kg + k, (h + ph - r * dh) / sh, (w + pw - s * dw) / sw]``, zero unless
  both divisions are exact and land inside the output.
* grad_weight: ``dw[k, q] = sum_m dy[m, k] * A[m, q]`` (the forward gather, now on the reduction
  side). ``N * Ho * Wo`` is usually far larger than the ``Kg x Cg*kh*kw`` output, so the pixels
  are split over several programs (split-K); each split writes its float32 partial sum to its own
  slice of a buffer and one ``sum`` over the splits finishes it: deterministic, no atomics.
* grad_bias: ``grad_output.sum((0, 2, 3))`` in float32 (a plain reduction torch does well).

The tap order inside ``q`` follows the memory: channel-fastest when channels are the contiguous
dimension (channels_last), otherwise ``s``-fastest (NCHW, and the weight's own ``[K, C, kh, kw]``
order), so neighbouring reduction indices read neighbouring addresses.

Tiles are autotuned per GEMM size and dtype on a GPU; under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) a single small tile is used so tests stay fast.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import mm as _mm
from ._common import precision as _precision
from ._common import tile_configs

__all__ = ["conv2d_forward_op", "conv2d_backward_op", "output_memory_format"]

_ACTIVATIONS = (None, "relu", "relu6", "silu", "gelu")
# grad_weight splits its pixel reduction in multiples of this many pixels: a multiple of every BK
# (so no tile straddles two splits) and enough work per program; small in the interpreter so the
# tests split too
_PIXEL_CHUNK = 32 if _INTERPRET else 512


# ---- tiles ---------------------------------------------------------------------------------------


def _tile_configs(interpret: bool) -> list[triton.Config]:
    """Autotuning candidates (BM rows x BN cols, BK reduction step); all powers of two >= 16 for
    ``tl.dot``. The interpreter gets exactly one, so autotuning never benchmarks there."""
    gpu_tiles = [  # (BM, BN, BK, num_warps, num_stages)
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 32, 32, 4, 4),
        (32, 32, 64, 2, 4),
        (128, 16, 32, 4, 3),  # few output channels per group (depthwise: one)
    ]
    return tile_configs(("BM", "BN", "BK"), gpu_tiles, (32, 16, 16, 1, 1), interpret)


def _prune_tiles(configs, named_args, **kwargs):
    """Drop tiles far larger than the GEMM (a depthwise conv has one column per group): they only
    add masked work and tuning time. Always keeps at least the smallest tile."""
    max_bm = max(16, triton.next_power_of_2(named_args["ROWS"]))
    max_bn = max(16, triton.next_power_of_2(named_args["COLS"]))
    fitting = [c for c in configs if c.kwargs["BM"] <= max_bm and c.kwargs["BN"] <= max_bn]
    return fitting or [min(configs, key=lambda c: c.kwargs["BM"] * c.kwargs["BN"])]


def _autotuned(kernel):
    return triton.autotune(
        configs=_tile_configs(_INTERPRET),
        key=["ROWS", "COLS", "RED"],  # the autotuner adds the tensors' dtypes to the key
        prune_configs_by={"early_config_prune": _prune_tiles},
    )(kernel)


# ---- shared device helpers -------------------------------------------------------------------------


@triton.jit
def _pixel(offs, HEIGHT, WIDTH):
    """Flat pixel index over [N, HEIGHT, WIDTH] -> (n, row, column)."""
    plane = HEIGHT * WIDTH
    rem = offs % plane
    return offs // plane, rem // WIDTH, rem % WIDTH


@triton.jit
def _split_taps(q, CH, KH: tl.constexpr, KW: tl.constexpr, CHANNEL_FASTEST: tl.constexpr):
    """Reduction index q over CH * KH * KW -> (channel, r, s), in the order that follows memory."""
    if CHANNEL_FASTEST:
        tap = q // CH
        return q % CH, tap // KW, tap % KW
    else:
        rest = q // KW
        return rest // KH, rest % KH, q % KW


@triton.jit
def _gather(
    ptr,
    row_base,
    row_h,
    row_w,
    row_ok,
    ch,
    r,
    s,
    col_ok,
    s_c,
    s_h,
    s_w,
    HEIGHT,
    WIDTH,
    stride_h,
    stride_w,
    dil_h,
    dil_w,
    TRANSPOSED: tl.constexpr,
):
    """Load the implicit-GEMM tile T[i, j] = t[image of row i, ch[j], h, w] (zero outside the image).

    Rows are pixels: ``row_base`` is the offset of their image (and group's first channel),
    ``row_h`` / ``row_w`` their spatial anchor. Columns are taps (ch, r, s).
    Direct (forward and grad_weight): anchor = pixel * stride - pad, h = anchor + r * dil.
    TRANSPOSED (grad_input): anchor = pixel + pad, h = (anchor - r * dil) / stride, kept only where
    the division is exact (the tap really reached this input pixel).
    """
    if TRANSPOSED:
        num_h = row_h[:, None] - r[None, :] * dil_h
        num_w = row_w[:, None] - s[None, :] * dil_w
        h = num_h // stride_h
        w = num_w // stride_w
        ok = (num_h >= 0) & (num_w >= 0) & (num_h % stride_h == 0) & (num_w % stride_w == 0)
        ok = ok & (h < HEIGHT) & (w < WIDTH)
    else:
        h = row_h[:, None] + r[None, :] * dil_h
        w = row_w[:, None] + s[None, :] * dil_w
        ok = (h >= 0) & (h < HEIGHT) & (w >= 0) & (w < WIDTH)
    ok = ok & row_ok[:, None] & col_ok[None, :]
    offs = row_base[:, None] + ch.to(tl.int64)[None, :] * s_c + h * s_h + w * s_w
    return tl.load(ptr + offs, mask=ok, other=0.0)


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    # tl.where rather than tl.maximum/minimum so NaN propagates as in torch
    if ACTIVATION == "relu":
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == "relu6":
        x = tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":  # exact (erf) GELU, as nn.GELU()
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return x


# ---- kernels -------------------------------------------------------------------------------------


@_autotuned
@triton.jit
def _conv_fwd_kernel(
    X,
    Wt,
    BIAS,
    RES,
    Y,
    ROWS,
    COLS,
    RED,
    C_GROUP,
    H,
    W,
    HO,
    WO,
    sxn,
    sxc,
    sxh,
    sxw,
    swk,
    swc,
    swh,
    sww,
    sb,
    srn,
    srk,
    srh,
    srw,
    syn,
    syk,
    syh,
    syw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CHANNEL_FASTEST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = offs_m < ROWS
    n, ho, wo = _pixel(offs_m, HO, WO)
    x_base = n.to(tl.int64) * sxn + (g * C_GROUP).to(tl.int64) * sxc
    anchor_h = ho * stride_h - pad_h
    anchor_w = wo * stride_w - pad_w

    offs_k = tl.program_id(1) * BN + tl.arange(0, BN)
    k_ok = offs_k < COLS
    k_out = g * COLS + offs_k  # absolute output channel
    w_cols = k_out.to(tl.int64) * swk

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for q0 in range(0, RED, BK):
        offs_q = q0 + tl.arange(0, BK)
        q_ok = offs_q < RED
        c, r, s = _split_taps(offs_q, C_GROUP, KH, KW, CHANNEL_FASTEST)
        a = _gather(
            X,
            x_base,
            anchor_h,
            anchor_w,
            m_ok,
            c,
            r,
            s,
            q_ok,
            sxc,
            sxh,
            sxw,
            H,
            W,
            stride_h,
            stride_w,
            dil_h,
            dil_w,
            False,
        )
        w_rows = c.to(tl.int64) * swc + r * swh + s * sww
        b = tl.load(Wt + w_rows[:, None] + w_cols[None, :], mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(a, b, PREC)

    if HAS_BIAS:
        acc += tl.load(BIAS + k_out.to(tl.int64) * sb, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & k_ok[None, :]
    if HAS_RESIDUAL:
        r_offs = (n.to(tl.int64) * srn + ho * srh + wo * srw)[:, None] + k_out.to(tl.int64)[None, :] * srk
        acc += tl.load(RES + r_offs, mask=out_ok, other=0.0).to(tl.float32)
    acc = _activate(acc, ACTIVATION)
    y_rows = n.to(tl.int64) * syn + ho * syh + wo * syw
    y_offs = y_rows[:, None] + k_out.to(tl.int64)[None, :] * syk
    tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=out_ok)


@_autotuned
@triton.jit
def _conv_bwd_input_kernel(
    DY,
    Wt,
    DX,
    ROWS,
    COLS,
    RED,
    K_GROUP,
    H,
    W,
    HO,
    WO,
    syn,
    syk,
    syh,
    syw,
    swk,
    swc,
    swh,
    sww,
    sxn,
    sxc,
    sxh,
    sxw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CHANNEL_FASTEST: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_ok = offs_m < ROWS
    n, h, w = _pixel(offs_m, H, W)
    dy_base = n.to(tl.int64) * syn + (g * K_GROUP).to(tl.int64) * syk

    offs_c = tl.program_id(1) * BN + tl.arange(0, BN)
    c_ok = offs_c < COLS
    c_in = g * COLS + offs_c  # absolute input channel
    w_cols = offs_c.to(tl.int64) * swc  # the weight holds only its group's channels

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for q0 in range(0, RED, BK):
        offs_q = q0 + tl.arange(0, BK)
        q_ok = offs_q < RED
        k, r, s = _split_taps(offs_q, K_GROUP, KH, KW, CHANNEL_FASTEST)
        a = _gather(
            DY,
            dy_base,
            h + pad_h,
            w + pad_w,
            m_ok,
            k,
            r,
            s,
            q_ok,
            syk,
            syh,
            syw,
            HO,
            WO,
            stride_h,
            stride_w,
            dil_h,
            dil_w,
            True,
        )
        w_rows = (g * K_GROUP + k).to(tl.int64) * swk + r * swh + s * sww
        b = tl.load(Wt + w_rows[:, None] + w_cols[None, :], mask=q_ok[:, None] & c_ok[None, :], other=0.0)
        acc += _mm(a, b, PREC)

    # every input pixel is written, also those no tap reached (their gradient is 0)
    dx_rows = n.to(tl.int64) * sxn + h * sxh + w * sxw
    dx_offs = dx_rows[:, None] + c_in.to(tl.int64)[None, :] * sxc
    tl.store(DX + dx_offs, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


@_autotuned
@triton.jit
def _conv_bwd_weight_kernel(
    DY,
    X,
    PARTIAL,
    ROWS,
    COLS,
    RED,
    C_GROUP,
    GROUPS,
    PIXELS_PER_SPLIT,
    H,
    W,
    HO,
    WO,
    syn,
    syk,
    syh,
    syw,
    sxn,
    sxc,
    sxh,
    sxw,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    CHANNEL_FASTEST: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    g = tl.program_id(2) % GROUPS
    split = tl.program_id(2) // GROUPS

    offs_k = tl.program_id(0) * BM + tl.arange(0, BM)
    k_ok = offs_k < ROWS
    k_out = g * ROWS + offs_k
    dy_rows = k_out.to(tl.int64) * syk

    offs_q = tl.program_id(1) * BN + tl.arange(0, BN)
    q_ok = offs_q < COLS
    c, r, s = _split_taps(offs_q, C_GROUP, KH, KW, CHANNEL_FASTEST)

    pixel_start = split * PIXELS_PER_SPLIT
    pixel_end = tl.minimum(RED, pixel_start + PIXELS_PER_SPLIT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for m0 in range(pixel_start, pixel_end, BK):
        offs_m = m0 + tl.arange(0, BK)
        m_ok = offs_m < pixel_end
        n, ho, wo = _pixel(offs_m, HO, WO)
        dy_cols = n.to(tl.int64) * syn + ho * syh + wo * syw
        dy = tl.load(DY + dy_rows[:, None] + dy_cols[None, :], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        x_base = n.to(tl.int64) * sxn + (g * C_GROUP).to(tl.int64) * sxc
        a = _gather(
            X,
            x_base,
            ho * stride_h - pad_h,
            wo * stride_w - pad_w,
            m_ok,
            c,
            r,
            s,
            q_ok,
            sxc,
            sxh,
            sxw,
            H,
            W,
            stride_h,
            stride_w,
            dil_h,
            dil_w,
            False,
        )
        acc += _mm(dy, a, PREC)

    # PARTIAL is [splits, K, C_GROUP * KH * KW] contiguous: the weight's own [K, Cg, kh, kw] order
    q_natural = (c * KH + r) * KW + s
    out_offs = (split * GROUPS * ROWS + k_out).to(tl.int64)[:, None] * COLS + q_natural[None, :]
    tl.store(PARTIAL + out_offs, acc, mask=k_ok[:, None] & q_ok[None, :])


# ---- host side -----------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def output_memory_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format torch's own conv gives the output: ATen's ``suggest_memory_format``, i.e.
    channels_last when the strides order the dimensions C < W < H < N (strided channels_last views
    included), contiguous otherwise and in the ambiguous cases (empty tensors, N111 shapes)."""
    sizes, strides = input.shape, input.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    min_stride = 0
    for d in (1, 3, 2, 0):  # innermost to outermost in channels_last
        if sizes[d] == 0 or strides[d] < min_stride or (d == 0 and min_stride == strides[1]):
            return torch.contiguous_format
        min_stride = strides[d] * max(sizes[d], 1)
    return torch.channels_last


def _channels_innermost(t: torch.Tensor) -> bool:
    return t.stride(1) < t.stride(3)


def _out_size(size, kernel, stride, pad, dil):
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def conv2d_forward_op(input, weight, bias, stride, padding, dilation, groups, activation, residual=None):
    """``fastdl::conv2d`` on Triton: conv2d (+ bias, + residual of the output's shape, read at its
    own strides) followed by ``activation``, written once."""
    assert input.dtype in _DTYPES and weight.dtype == input.dtype, (input.dtype, weight.dtype)
    assert activation in _ACTIVATIONS, activation
    n, c, h, w = input.shape
    k, c_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    out = torch.empty((n, k, ho, wo), dtype=input.dtype, device=input.device, memory_format=output_memory_format(input))
    if out.numel() == 0:
        return out
    rows, cols = n * ho * wo, k // groups
    grid = lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(cols, meta["BN"]), groups)  # noqa: E731
    _conv_fwd_kernel[grid](
        input,
        weight,
        input if bias is None else bias,
        out if residual is None else residual,
        out,
        rows,
        cols,
        c_group * kh * kw,
        c_group,
        h,
        w,
        ho,
        wo,
        *input.stride(),
        *weight.stride(),
        0 if bias is None else bias.stride(0),
        *(out if residual is None else residual).stride(),
        *out.stride(),
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        KH=kh,
        KW=kw,
        CHANNEL_FASTEST=_channels_innermost(input),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION="none" if activation is None else activation,
        PREC=_precision(input.dtype),
    )
    return out


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU a few times over."""
    if _INTERPRET or device.type != "cuda":
        return 4  # small, so the interpreter tests split too
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _weight_grad_split(pixels: int, weight_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) of the grad_weight reduction over ``pixels`` output pixels.

    Splits only as far as needed to fill the device (assuming 64 x 64 output tiles), in whole
    chunks of _PIXEL_CHUNK pixels."""
    chunk = _PIXEL_CHUNK
    splits = max(1, min(triton.cdiv(_target_programs(device), weight_tiles), triton.cdiv(pixels, chunk)))
    per_split = triton.cdiv(triton.cdiv(pixels, splits), chunk) * chunk
    return triton.cdiv(pixels, per_split), per_split


def conv2d_backward_op(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    """``fastdl::_conv2d_backward`` on Triton: (grad_input, grad_weight, grad_bias) of the conv,
    ``grad_output`` taken before the activation; entries not in ``output_mask`` are empty."""
    assert input.dtype in _DTYPES and weight.dtype == input.dtype, (input.dtype, weight.dtype)
    n, c, h, w = input.shape
    k, c_group, kh, kw = weight.shape
    ho, wo = grad_output.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    grad_output = grad_output.to(input.dtype)
    k_group = k // groups
    prec = _precision(input.dtype)
    geometry = (sh, sw, ph, pw, dh, dw)
    empty = input.new_empty(0)

    grad_input = empty
    if output_mask[0]:
        grad_input = torch.empty(
            (n, c, h, w), dtype=input.dtype, device=input.device, memory_format=output_memory_format(input)
        )
        rows, red = n * h * w, k_group * kh * kw
        if grad_input.numel():
            grid = lambda meta: (triton.cdiv(rows, meta["BM"]), triton.cdiv(c_group, meta["BN"]), groups)  # noqa: E731
            _conv_bwd_input_kernel[grid](
                grad_output,
                weight,
                grad_input,
                rows,
                c_group,
                red,
                k_group,
                h,
                w,
                ho,
                wo,
                *grad_output.stride(),
                *weight.stride(),
                *grad_input.stride(),
                *geometry,
                KH=kh,
                KW=kw,
                CHANNEL_FASTEST=_channels_innermost(grad_output),
                PREC=prec,
            )

    grad_weight = empty
    if output_mask[1]:
        pixels, taps = n * ho * wo, c_group * kh * kw
        if pixels == 0 or weight.numel() == 0:
            grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        else:
            weight_tiles = triton.cdiv(k_group, 64) * triton.cdiv(taps, 64) * groups
            splits, per_split = _weight_grad_split(pixels, weight_tiles, input.device)
            partial = torch.empty((splits, k, taps), dtype=torch.float32, device=input.device)
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(k_group, meta["BM"]),
                triton.cdiv(taps, meta["BN"]),
                groups * splits,
            )
            _conv_bwd_weight_kernel[grid](
                grad_output,
                input,
                partial,
                k_group,
                taps,
                pixels,
                c_group,
                groups,
                per_split,
                h,
                w,
                ho,
                wo,
                *grad_output.stride(),
                *input.stride(),
                *geometry,
                KH=kh,
                KW=kw,
                CHANNEL_FASTEST=_channels_innermost(input),
                PREC=prec,
            )
            grad_weight = partial.sum(0).view(k, c_group, kh, kw).to(input.dtype)

    grad_bias = empty
    if output_mask[2]:
        grad_bias = grad_output.sum((0, 2, 3), dtype=torch.float32).to(input.dtype)
    return grad_input, grad_weight, grad_bias
