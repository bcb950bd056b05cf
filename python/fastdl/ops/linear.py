"""``fastdl.ops.linear``: ``F.linear`` with a CPU kernel for few rows (decoding).

The product of a few input rows with a large weight matrix (a language model's decoding step:
one token per sequence) streams the weights; the C++ CPU kernel reads each weight once for up
to 8 rows. Larger products, float64 and other devices take torch's own ``F.linear`` (the BLAS
libtorch links, cuBLAS on CUDA), which is also the composite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import register_autocast, register_composite

_OP = "linear"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear``: ``input @ weight.T + bias``.

    Args:
        input: ``Tensor[*, in_features]``.
        weight: ``Tensor[out_features, in_features]``.
        bias: ``Tensor[out_features]`` or ``None``.

    Returns:
        ``Tensor[*, out_features]`` in ``input``'s dtype.

    Differentiable w.r.t. all three.
    """
    return torch.ops.fastdl.linear.default(input, weight, bias)


# ---- argument checks (shared by the composite and the fake kernel; C++ twin: linear.h) --------


def _fail(msg: str):
    raise RuntimeError(f"linear: {msg}")


def check_inputs(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if input.dtype not in _DTYPES:
        _fail(f"input has unsupported dtype {input.dtype}; supported: float32, float64, float16, bfloat16")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != input.dtype:
            _fail(f"input has dtype {input.dtype} but {name} has dtype {t.dtype}")
        if t.device != input.device:
            _fail(f"input is on {input.device} but {name} is on {t.device}; move them to the same device")
    if input.dim() < 1:
        _fail("input must have at least 1 dimension, got a 0-D tensor")
    if weight.dim() != 2:
        _fail(f"expected weight to be a 2-D tensor [out_features, in_features], but got shape {list(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        _fail(
            f"input has {input.shape[-1]} features (last dimension of {list(input.shape)}) but weight "
            f"{list(weight.shape)} expects {weight.shape[1]}"
        )
    if bias is not None and list(bias.shape) != [weight.shape[0]]:
        _fail(f"expected bias of shape [{weight.shape[0]}] (out_features), got {list(bias.shape)}")


@torch.library.register_fake("fastdl::linear")
def _linear_fake(input, weight, bias):
    check_inputs(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


# ---- autograd: the products of F.linear's backward ---------------------------------------------


def _setup_context(ctx, inputs, output):
    input, weight, bias = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_input = grad @ weight
    # an explicit row count: reshape(-1, 0) is ambiguous when there are no outputs or features
    n = math.prod(input.shape[:-1])
    rows = grad.reshape(n, grad.shape[-1])
    if ctx.needs_input_grad[1]:
        grad_weight = rows.T @ input.reshape(n, input.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_input, grad_weight, grad_bias


torch.library.register_autograd("fastdl::linear", _backward, setup_context=_setup_context)
register_autocast(_OP, "lower")


# ---- composite (plain PyTorch; serves CUDA, MPS and every other device) ------------------------


@register_composite(_OP)
def linear_composite(input, weight, bias):
    check_inputs(input, weight, bias)
    return F.linear(input, weight, bias)
