"""2-D convolution (``nn.Conv2d`` semantics) with the bias, a residual and an activation fused
into the output pass, so the output is written once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import register_composite, register_triton_kernels, triton_available
from ._utils import INT64_MAX, pair, suggest_memory_format

__all__ = ["conv2d", "conv2d_winograd_weight", "ACTIVATIONS", "check_activation"]

# Activations the kernels fuse, with their plain-PyTorch forms (GELU is the exact erf form).
ACTIVATIONS = {
    None: lambda x: x,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
}


def check_activation(activation, where: str = "conv2d") -> None:
    """Raise a ValueError naming ``where`` unless ``activation`` is one the kernels fuse."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}")


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    activation: str | None = None,
    *,
    residual: Tensor | None = None,
    winograd_weight: Tensor | None = None,
) -> Tensor:
    """``activation(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)``
    in one pass.

    Args:
        input: ``Tensor[N, C, H, W]``, contiguous or channels_last (any strides work).
        weight: ``Tensor[K, C / groups, kh, kw]``.
        bias: ``Tensor[K]`` or None.
        stride, dilation: int or ``(h, w)``, positive.
        padding: int, ``(h, w)``, ``"valid"`` (none) or ``"same"`` (output size = input size,
            stride 1 only; an odd total is split with the extra row/column at the bottom/right,
            as ``nn.Conv2d`` does).
        groups: divides both C and K; ``groups == C`` is a depthwise convolution.
        activation: None, ``"relu"``, ``"relu6"``, ``"silu"`` or ``"gelu"`` (exact erf form).
        residual: ``Tensor[N, K, Ho, Wo]`` (the output's shape, the input's dtype) or None: added
            before the activation, as a ResNet block adds its shortcut. It is read in the output's
            memory format (copied first if its layout differs).
        winograd_weight: ``Tensor[16, C, K]`` float32 or None: ``conv2d_winograd_weight(weight)``
            computed once, for inference with fixed weights. The CPU kernel then skips
            transforming the weights on each call where it runs Winograd (3x3, stride 1); every
            other kernel ignores it. It must match ``weight``: nothing checks its values.

    Returns:
        ``Tensor[N, K, Ho, Wo]`` in the input's memory format (channels_last in, channels_last out).

    Differentiable w.r.t. input, weight, bias and residual. With ``"silu"``/``"gelu"`` and gradients
    required, the activation runs as a separate op so that its input is kept for the backward
    (the fused op would have to recompute it). dtypes: float32/float64 on CPU (float16/bfloat16
    computed in float32), float32/float16/bfloat16 on CUDA.
    """
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    if isinstance(padding, str):
        input, padding = _resolve_padding_mode(input, weight, padding, stride, dilation)
    else:
        padding = pair(padding, "padding")
    check_activation(activation)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, residual)
    )
    op = torch.ops.fastdl.conv2d.default
    if activation in ("silu", "gelu") and needs_grad:
        out = op(input, weight, bias, stride, padding, dilation, groups, None, winograd_weight, residual)
        return ACTIVATIONS[activation](out)
    return op(input, weight, bias, stride, padding, dilation, groups, activation, winograd_weight, residual)


# Winograd F(2x2, 3x3)'s filter transform G (U = G f G^T); its 4x4 points are flattened row-major.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


@torch.no_grad()
def conv2d_winograd_weight(weight: Tensor) -> Tensor:
    """3x3 filters in the Winograd domain, the form the CPU kernel multiplies by: ``Tensor[K, C,
    3, 3]`` -> ``Tensor[16, C, K]`` float32 with ``U[4 * i + j, c, k] = (G weight[k, c] G^T)[i, j]``.

    Pass it as ``conv2d(..., winograd_weight=U)`` when the same weights serve many calls
    (inference); :meth:`fastdl.nn.Conv2d.prepack` does this for a module. Computed in float64.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(
            f"conv2d_winograd_weight: expected weight to be a Tensor[K, C, 3, 3], got shape {tuple(weight.shape)}"
        )
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,kcab,jb->ijck", g, weight.double(), g)
    return u.reshape(16, weight.size(1), weight.size(0)).float().contiguous()


def _check_winograd_weight(op, weight, groups, winograd_weight):
    """The Python twin of the C++ check of a prepacked ``winograd_weight``."""
    if winograd_weight is None:
        return
    k, c, kh, kw = weight.shape
    torch._check(
        (kh, kw) == (3, 3) and groups == 1,
        lambda: (
            f"{op}: winograd_weight is only for 3x3 convolutions with groups=1, got weight of shape {tuple(weight.shape)} and groups={groups}"
        ),
    )
    torch._check(
        tuple(winograd_weight.shape) == (16, c, k),
        lambda: (
            f"{op}: expected winograd_weight to be a Tensor[16, {c}, {k}] (conv2d_winograd_weight of the weight), got shape {tuple(winograd_weight.shape)}"
        ),
    )
    torch._check(
        winograd_weight.dtype == torch.float32,
        lambda: f"{op}: winograd_weight must be float32, got {winograd_weight.dtype}",
    )
    torch._check(
        winograd_weight.device == weight.device,
        lambda: (
            f"{op}: weight is on {weight.device} but winograd_weight is on {winograd_weight.device}; move them to the same device"
        ),
    )


def _resolve_padding_mode(input, weight, mode, stride, dilation):
    """``"valid"``/``"same"`` -> symmetric padding, padding the input first where "same" needs an
    odd total (extra row/column at the bottom/right, as ``nn.Conv2d``)."""
    if mode == "valid":
        return input, (0, 0)
    if mode != "same":
        raise ValueError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', got {mode!r}")
    if stride != (1, 1):
        raise ValueError(f"conv2d: padding='same' needs stride 1, got stride={stride}")
    if weight.dim() != 4:
        raise ValueError(
            f"conv2d: expected weight to be a 4-D tensor [K, C / groups, kh, kw], got {tuple(weight.shape)}"
        )
    totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    extra = [t % 2 for t in totals]
    if any(extra):
        input = F.pad(input, (0, extra[1], 0, extra[0]))
    return input, (totals[0] // 2, totals[1] // 2)


def _output_size(op, input, weight, bias, stride, padding, dilation, groups):
    """The Python twin of the C++ argument checks; returns ``(Ho, Wo)``."""
    torch._check(
        input.dim() == 4,
        lambda: f"{op}: expected input to be a 4-D tensor [N, C, H, W], but got shape {tuple(input.shape)}",
    )
    torch._check(
        weight.dim() == 4,
        lambda: (
            f"{op}: expected weight to be a 4-D tensor [K, C / groups, kh, kw], but got shape {tuple(weight.shape)}"
        ),
    )
    torch._check(input.dtype.is_floating_point, lambda: f"{op}: input has unsupported dtype {input.dtype}")
    torch._check(
        input.dtype == weight.dtype, lambda: f"{op}: input has dtype {input.dtype} but weight has dtype {weight.dtype}"
    )
    torch._check(
        input.device == weight.device,
        lambda: f"{op}: input is on {input.device} but weight is on {weight.device}; move them to the same device",
    )
    torch._check(all(s > 0 for s in stride), lambda: f"{op}: stride must be positive, got {list(stride)}")
    torch._check(all(d > 0 for d in dilation), lambda: f"{op}: dilation must be positive, got {list(dilation)}")
    torch._check(all(p >= 0 for p in padding), lambda: f"{op}: padding must be non-negative, got {list(padding)}")
    torch._check(groups > 0, lambda: f"{op}: groups must be positive, got {groups}")
    n, c, h, w = input.shape
    k, cg, kh, kw = weight.shape
    torch._check(
        c % groups == 0,
        lambda: f"{op}: groups={groups} must divide the input channels, got input of shape {tuple(input.shape)}",
    )
    torch._check(
        k % groups == 0,
        lambda: f"{op}: groups={groups} must divide the output channels, got weight of shape {tuple(weight.shape)}",
    )
    torch._check(
        cg * groups == c,
        lambda: (
            f"{op}: input has {c} channels but weight of shape {tuple(weight.shape)} with groups={groups} expects {cg * groups}"
        ),
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.size(0) == k,
            lambda: f"{op}: bias must be a Tensor[{k}], got shape {tuple(bias.shape)}",
        )
        torch._check(
            bias.dtype == input.dtype, lambda: f"{op}: input has dtype {input.dtype} but bias has dtype {bias.dtype}"
        )
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    for what, value in (
        ("the dilated kernel height", span_h),
        ("the dilated kernel width", span_w),
        ("the padded input height", h + 2 * padding[0]),
        ("the padded input width", w + 2 * padding[1]),
    ):
        torch._check(value <= INT64_MAX, lambda: f"{op}: {what} overflows int64 ({value})")
    torch._check(
        span_h <= h + 2 * padding[0] and span_w <= w + 2 * padding[1],
        lambda: (
            f"{op}: kernel of size {span_h}x{span_w} (dilated) is larger than the padded input "
            f"{h + 2 * padding[0]}x{w + 2 * padding[1]}"
        ),
    )
    return (h + 2 * padding[0] - span_h) // stride[0] + 1, (w + 2 * padding[1] - span_w) // stride[1] + 1


def _check_residual(op, input, weight, out_h, out_w, residual):
    """The Python twin of the C++ check of ``residual``."""
    if residual is None:
        return
    shape = (input.size(0), weight.size(0), out_h, out_w)
    torch._check(
        tuple(residual.shape) == shape,
        lambda: f"{op}: residual must have the output's shape {list(shape)}, got {list(residual.shape)}",
    )
    torch._check(
        residual.dtype == input.dtype,
        lambda: f"{op}: input has dtype {input.dtype} but residual has dtype {residual.dtype}",
    )
    torch._check(
        residual.device == input.device,
        lambda: f"{op}: input is on {input.device} but residual is on {residual.device}; move them to the same device",
    )


def _new_output(input, weight, out_h, out_w):
    shape = (input.size(0), weight.size(0), out_h, out_w)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


@torch.library.register_fake("fastdl::conv2d")
def _conv2d_fake(
    input, weight, bias, stride, padding, dilation, groups, activation, winograd_weight=None, residual=None
):
    out_h, out_w = _output_size("conv2d", input, weight, bias, stride, padding, dilation, groups)
    _check_winograd_weight("conv2d", weight, groups, winograd_weight)
    _check_residual("conv2d", input, weight, out_h, out_w, residual)
    return _new_output(input, weight, out_h, out_w)


@torch.library.register_fake("fastdl::_conv2d_backward")
def _conv2d_backward_fake(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    _output_size("conv2d_backward", input, weight, None, stride, padding, dilation, groups)
    empty = input.new_empty(0)
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(input)) if output_mask[0] else empty,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else empty,
        input.new_empty(weight.size(0)) if output_mask[2] else empty,
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, activation, _, residual = inputs
    # relu/relu6 derivatives read the output; silu/gelu need the pre-activation, recomputed.
    reads_output = activation in ("relu", "relu6")
    recomputes = activation in ("silu", "gelu")
    ctx.save_for_backward(input, weight, bias, output if reads_output else None, residual if recomputes else None)
    ctx.params = (stride, padding, dilation, groups)
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight, bias, output, residual = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = grad * (output > 0)
    elif ctx.activation == "relu6":
        grad = grad * ((output > 0) & (output < 6))
    elif ctx.activation is not None:
        pre = torch.ops.fastdl.conv2d.default(input, weight, bias, *ctx.params, None, None, residual)
        if ctx.activation == "silu":
            grad = torch.ops.aten.silu_backward(grad, pre)
        else:
            grad = torch.ops.aten.gelu_backward(grad, pre)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grads = torch.ops.fastdl._conv2d_backward.default(grad, input, weight, *ctx.params, mask)
    grad_input, grad_weight, grad_bias = (g if wanted else None for g, wanted in zip(grads, mask))
    # The dispatcher drops trailing arguments left at their defaults: one gradient per argument passed.
    passed = len(ctx.needs_input_grad)
    grad_residual = grad if passed > 9 and ctx.needs_input_grad[9] else None
    return (grad_input, grad_weight, grad_bias, None, None, None, None, None, None, grad_residual)[:passed]


torch.library.register_autograd("fastdl::conv2d", _backward, setup_context=_setup_context)


# ---- composite --------------------------------------------------------------------------------


@register_composite("conv2d", cuda_kernel="Triton")
def _conv2d_composite(
    input, weight, bias, stride, padding, dilation, groups, activation, winograd_weight=None, residual=None
):
    out_h, out_w = _output_size("conv2d", input, weight, bias, stride, padding, dilation, groups)
    _check_winograd_weight("conv2d", weight, groups, winograd_weight)
    _check_residual("conv2d", input, weight, out_h, out_w, residual)
    check_activation(activation)
    if weight.size(1) == 0:  # no input channels: every sum is empty (F.conv2d returns no channels)
        pre = input.new_zeros(input.size(0), weight.size(0), out_h, out_w)
        pre = pre if bias is None else pre + bias.view(1, -1, 1, 1)
    else:
        pre = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    out = ACTIVATIONS[activation](pre if residual is None else pre + residual)
    return out.contiguous(memory_format=suggest_memory_format(input))


@register_composite("_conv2d_backward", cuda_kernel="Triton")
def _conv2d_backward_composite(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
    _output_size("conv2d_backward", input, weight, None, stride, padding, dilation, groups)
    grads = torch.ops.aten.convolution_backward(
        grad_output, input, weight, [weight.size(0)], stride, padding, dilation, False, [0, 0], groups, output_mask
    )
    empty = input.new_empty(0)
    grad_input = grads[0].contiguous(memory_format=suggest_memory_format(input)) if output_mask[0] else empty
    grad_weight = grads[1].contiguous() if output_mask[1] else empty
    return grad_input, grad_weight, grads[2] if output_mask[2] else empty


def _register_triton():
    """Serve CUDA with fastdl.kernels.conv2d (float64 inputs are passed on to the composite)."""
    from fastdl.kernels import conv2d as triton_conv2d

    def forward(
        input, weight, bias, stride, padding, dilation, groups, activation, winograd_weight=None, residual=None
    ):
        if input.dtype == torch.float64 or weight.size(1) == 0:
            return _conv2d_composite(
                input, weight, bias, stride, padding, dilation, groups, activation, winograd_weight, residual
            )
        out_h, out_w = _output_size("conv2d", input, weight, bias, stride, padding, dilation, groups)
        _check_winograd_weight("conv2d", weight, groups, winograd_weight)
        _check_residual("conv2d", input, weight, out_h, out_w, residual)
        return triton_conv2d.conv2d_forward_op(
            input, weight, bias, stride, padding, dilation, groups, activation, residual
        )

    def backward(grad_output, input, weight, stride, padding, dilation, groups, output_mask):
        if input.dtype == torch.float64:
            return _conv2d_backward_composite(
                grad_output, input, weight, stride, padding, dilation, groups, output_mask
            )
        _output_size("conv2d_backward", input, weight, None, stride, padding, dilation, groups)
        return triton_conv2d.conv2d_backward_op(
            grad_output, input, weight, stride, padding, dilation, groups, output_mask
        )

    register_triton_kernels({"conv2d": forward, "_conv2d_backward": backward})


if triton_available():
    _register_triton()
