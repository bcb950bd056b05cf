"""Layer normalisation over the trailing dimensions, with an optional fused residual add.

``layer_norm(x, shape, w, b, residual=r)`` normalises ``x + r`` and also returns that sum, in one
pass over the data: the pre-norm transformer block's ``h = h + attn(...)`` followed by
``ln(h)`` reads and writes the residual stream once instead of three times.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._library import register_autocast, register_composite

__all__ = ["layer_norm"]

_OP = "layer_norm"


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
):
    """``torch.nn.functional.layer_norm``, optionally of ``input + residual``.

    Args:
        input: ``Tensor[*, *normalized_shape]``.
        normalized_shape: the trailing dimensions normalised together (an int for the last one).
        weight, bias: ``Tensor[*normalized_shape]`` or ``None`` (no scale / no shift).
        eps: added to the variance; finite and ``>= 0``.
        residual: ``Tensor`` of ``input``'s shape and dtype, or ``None``.

    Returns:
        ``Tensor`` of ``input``'s shape and dtype when ``residual`` is ``None``; otherwise
        ``(normalized, input + residual)``, where ``normalized = layer_norm(input + residual)``.

    Statistics are accumulated in float32 (float64 for float64 inputs), as torch does.
    Differentiable w.r.t. ``input``, ``weight``, ``bias`` and ``residual``.
    """
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    out, residual_out, _, _ = torch.ops.fastdl.layer_norm.default(input, shape, weight, bias, residual, float(eps))
    return out if residual is None else (out, residual_out)


# ---- argument checks (shared by the composite and the fake kernels; C++ twin: layer_norm.h) ----


def _fail(op: str, msg: str):
    raise RuntimeError(f"{op}: {msg}")


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(op, input, normalized_shape, weight, bias, residual, eps) -> tuple[int, int]:
    """Returns (rows, row_size) after the checks the native kernels make."""
    if input.dtype not in _DTYPES:
        _fail(op, f"input has unsupported dtype {input.dtype}; supported: float16, bfloat16, float32, float64")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            _fail(op, f"input has dtype {input.dtype} but {name} has dtype {t.dtype}")
        if t.device != input.device:
            _fail(op, f"input is on {input.device} but {name} is on {t.device}; move them to the same device")
    if not math.isfinite(eps) or eps < 0:
        _fail(op, f"eps must be finite and >= 0, got {eps}")
    shape = list(normalized_shape)
    if not shape or any(s <= 0 for s in shape):
        _fail(op, f"normalized_shape must be a non-empty list of positive sizes, got {shape}")
    if input.dim() < len(shape) or list(input.shape[input.dim() - len(shape) :]) != shape:
        _fail(op, f"normalized_shape {shape} does not match the trailing dimensions of input {list(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and list(t.shape) != shape:
            _fail(op, f"expected {name} of shape {shape} (normalized_shape), got {list(t.shape)}")
    if residual is not None and residual.shape != input.shape:
        _fail(op, f"residual has shape {list(residual.shape)} but input has shape {list(input.shape)}")
    row_size = math.prod(shape)
    return input.numel() // row_size, row_size


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels ------------------------------------------------------------------------------


@torch.library.register_fake("fastdl::layer_norm")
def _layer_norm_fake(input, normalized_shape, weight, bias, residual, eps):
    rows, _ = check_inputs("layer_norm", input, normalized_shape, weight, bias, residual, eps)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    residual_out = torch.empty(input.shape if residual is not None else (0,), dtype=input.dtype, device=input.device)
    stats = torch.empty((rows,), dtype=stats_dtype(input.dtype), device=input.device)
    return out, residual_out, stats, torch.empty_like(stats)


@torch.library.register_fake("fastdl::_layer_norm_backward")
def _layer_norm_backward_fake(grad_out, input, weight, mean, rstd, normalized_shape, output_mask):
    check_inputs("_layer_norm_backward", input, normalized_shape, weight, None, None, 0.0)
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    wants_weight = output_mask[1] and weight is not None
    grad_weight = torch.empty(normalized_shape if wants_weight else (0,), dtype=input.dtype, device=input.device)
    grad_bias = torch.empty(normalized_shape if output_mask[2] else (0,), dtype=input.dtype, device=input.device)
    return grad_input, grad_weight, grad_bias


# ---- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, normalized_shape, weight, bias, residual, eps = inputs
    _, residual_out, mean, rstd = output
    # the normalised tensor is the sum when there is a residual: keep that, not the two addends
    ctx.save_for_backward(residual_out if residual is not None else input, weight, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_residual_out, _grad_mean, _grad_rstd):
    normalized_input, weight, mean, rstd = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if grad_out is not None:
        mask = [True, weight is not None and ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
        grad_input, grad_weight, grad_bias = torch.ops.fastdl._layer_norm_backward.default(
            grad_out, normalized_input, weight, mean, rstd, ctx.normalized_shape, mask
        )
        grad_weight = grad_weight if mask[1] else None
        grad_bias = grad_bias if mask[2] else None
    if (
        ctx.has_residual and grad_residual_out is not None
    ):  # the sum is an output too: its gradient reaches both addends
        grad_input = grad_residual_out if grad_input is None else grad_input + grad_residual_out
    return grad_input, None, grad_weight, grad_bias, grad_input if ctx.has_residual else None, None


torch.library.register_autograd("fastdl::layer_norm", _backward, setup_context=_setup_context)
# torch runs layer_norm in float32 under autocast; the sum and the output keep the input's dtype
register_autocast("layer_norm", "float32")


# ---- composite (plain PyTorch; serves MPS and devices without a native kernel) ----------------


@register_composite(_OP, cuda_kernel="Triton")
def layer_norm_composite(input, normalized_shape, weight, bias, residual, eps):
    rows, row_size = check_inputs("layer_norm", input, normalized_shape, weight, bias, residual, eps)
    x = input if residual is None else input + residual
    sdt = stats_dtype(input.dtype)
    xs = x.reshape(rows, row_size).to(sdt)
    mean = xs.mean(dim=1)
    var = (xs - mean[:, None]).square().mean(dim=1)
    rstd = torch.rsqrt(var + eps)
    y = (xs - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.reshape(-1).to(sdt)
    if bias is not None:
        y = y + bias.reshape(-1).to(sdt)
    residual_out = x if residual is not None else input.new_empty((0,))
    return y.to(input.dtype).reshape(input.shape), residual_out, mean, rstd


@register_composite("_layer_norm_backward", cuda_kernel="Triton")
def layer_norm_backward_composite(grad_out, input, weight, mean, rstd, normalized_shape, output_mask):
    rows, row_size = check_inputs("_layer_norm_backward", input, normalized_shape, weight, None, None, 0.0)
    sdt = stats_dtype(input.dtype)
    xhat = (input.reshape(rows, row_size).to(sdt) - mean[:, None]) * rstd[:, None]
    dy = grad_out.reshape(rows, row_size).to(sdt)
    g = dy * weight.reshape(-1).to(sdt) if weight is not None else dy
    dx = rstd[:, None] * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    empty = input.new_empty((0,))
    wants_weight = output_mask[1] and weight is not None
    grad_weight = (dy * xhat).sum(0).to(input.dtype).reshape(normalized_shape) if wants_weight else empty
    grad_bias = dy.sum(0).to(input.dtype).reshape(normalized_shape) if output_mask[2] else empty
    return dx.to(input.dtype).reshape(input.shape), grad_weight, grad_bias


# ---- CUDA: Triton kernels, registered only where they can run -----------------------------------

from ._library import register_triton_kernels, triton_available  # noqa: E402

if triton_available():
    from fastdl.kernels import layer_norm as triton_layer_norm

    register_triton_kernels(
        {
            "layer_norm": triton_layer_norm.layer_norm_forward_op,
            "_layer_norm_backward": triton_layer_norm.layer_norm_backward_op,
        }
    )
