"""RoI max-pooling (Fast R-CNN): max over each output bin's window of whole pixels."""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import register_autocast, register_composite
from ._utils import (
    BoxesLike,
    boxes_to_rois,
    check_backward_rois,
    check_output_size,
    check_rois,
    check_spatial_scale,
    pair,
)

__all__ = ["roi_pool"]


def roi_pool(input: Tensor, boxes: BoxesLike, output_size: int | tuple[int, int], spatial_scale: float = 1.0) -> Tensor:
    """Max-pool each box of ``input`` to a fixed ``output_size`` grid.

    Args:
        input: ``Tensor[N, C, H, W]``.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a list of ``Tensor[L, 4]``.
        output_size: ``(PH, PW)`` or an int.
        spatial_scale: feature-map size over image size.

    Returns:
        ``Tensor[K, C, PH, PW]``. Box corners are rounded to whole feature pixels (inclusive), bin
        ``p`` spans pixels ``floor(p * s) .. ceil((p + 1) * s)`` with ``s`` the bin size, clipped
        to the map; an empty bin gives 0. Same semantics as ``torchvision.ops.roi_pool``.

    Differentiable w.r.t. ``input`` (the gradient goes to each bin's max pixel; ties go to the
    first pixel in row-major order). dtypes: float32/float64, plus float16/bfloat16 on CUDA.
    """
    rois = boxes_to_rois(boxes, input)
    pooled_height, pooled_width = pair(output_size, "output_size")
    output, _ = torch.ops.fastdl.roi_pool.default(input, rois, float(spatial_scale), pooled_height, pooled_width)
    return output


@torch.library.register_fake("fastdl::roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    check_rois("roi_pool", input, rois, check_values=False)
    check_output_size("roi_pool", pooled_height, pooled_width)
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("fastdl::_roi_pool_backward")
def _roi_pool_backward_fake(
    grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
):
    _check_backward_args(
        grad, rois, argmax, pooled_height, pooled_width, batch_size, channels, height, width, check_values=False
    )
    return grad.new_empty((batch_size, channels, height, width))


def _check_backward_args(
    grad, rois, argmax, pooled_height, pooled_width, batch_size, channels, height, width, *, check_values: bool = True
) -> None:
    """``check_backward_args`` of ``csrc/ops/roi_pool/roi_pool.h``, plus its argmax range check."""
    op = "roi_pool_backward"
    if check_values:
        check_backward_rois(op, rois, batch_size, channels, height, width)
    torch._check(argmax.dtype == torch.long, lambda: f"{op}: argmax must be int64, got {argmax.dtype}")
    torch._check(
        grad.shape == argmax.shape,
        lambda: f"{op}: grad {list(grad.shape)} and argmax {list(argmax.shape)} must have the same shape",
    )
    torch._check(
        grad.dim() == 4 and grad.size(0) == rois.size(0) and grad.size(1) == channels,
        lambda: (
            f"{op}: expected grad of shape [{rois.size(0)}, {channels}, {pooled_height}, {pooled_width}], "
            f"got {list(grad.shape)}"
        ),
    )
    if check_values and argmax.numel() > 0:
        torch._check(
            int(argmax.max()) < height * width,
            lambda: f"{op}: argmax holds an index beyond the {height}x{width} map",
        )


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    _, argmax = output
    ctx.save_for_backward(rois, argmax)
    ctx.params = (spatial_scale, pooled_height, pooled_width)
    ctx.input_shape = input.shape
    ctx.mark_non_differentiable(argmax)


def _backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.fastdl._roi_pool_backward.default(grad, rois, argmax, *ctx.params, *ctx.input_shape)
    return grad_input, None, None, None, None


torch.library.register_autograd("fastdl::roi_pool", _backward, setup_context=_setup_context)
register_autocast("roi_pool", "float32")


# ---- composite --------------------------------------------------------------------------------


def _bin_edges(start, bin_size, pooled: int, size: int):
    """Per box and bin: the [lo, hi) pixel range on one axis, clipped to [0, size]."""
    p = torch.arange(pooled, device=start.device, dtype=bin_size.dtype)
    lo = (torch.floor(p[None] * bin_size[:, None]) + start[:, None]).clamp(0, size)
    hi = (torch.ceil((p[None] + 1) * bin_size[:, None]) + start[:, None]).clamp(0, size)
    return lo.long(), hi.long()


_ELEMENTS_PER_CHUNK = 1 << 24


@register_composite("roi_pool")
def roi_pool_composite(input, rois, spatial_scale, pooled_height, pooled_width):
    """Gathers every bin's pixel window, padded to the largest window, and takes a masked max."""
    check_rois("roi_pool", input, rois)
    check_output_size("roi_pool", pooled_height, pooled_width)
    check_spatial_scale("roi_pool", spatial_scale)
    n, c, h, w = input.shape
    k = rois.size(0)
    output = input.new_zeros((k, c, pooled_height, pooled_width))
    argmax = torch.full((k, c, pooled_height, pooled_width), -1, dtype=torch.long, device=input.device)
    if output.numel() == 0 or h == 0 or w == 0:  # no pixels: every bin is empty
        return output, argmax
    # torch.round rounds half to even, C's round() half away from zero: use the latter
    corners = rois[:, 1:] * spatial_scale
    corners = (torch.sign(corners) * torch.floor(corners.abs() + 0.5)).clamp(-(2**60), 2**60)  # kMaxCorner
    x1, y1, x2, y2 = corners.unbind(1)
    roi_w = (x2 - x1 + 1).clamp(min=1)
    roi_h = (y2 - y1 + 1).clamp(min=1)
    y_lo, y_hi = _bin_edges(y1, roi_h / pooled_height, pooled_height, h)  # [K, PH]
    x_lo, x_hi = _bin_edges(x1, roi_w / pooled_width, pooled_width, w)  # [K, PW]
    span_y = max(int((y_hi - y_lo).max()), 1)
    span_x = max(int((x_hi - x_lo).max()), 1)
    ys = y_lo[..., None] + torch.arange(span_y, device=input.device)  # [K, PH, SY]
    xs = x_lo[..., None] + torch.arange(span_x, device=input.device)  # [K, PW, SX]
    inside = (ys < y_hi[..., None])[:, :, None, :, None] & (xs < x_hi[..., None])[
        :, None, :, None, :
    ]  # [K, PH, PW, SY, SX]
    flat = ys.clamp(max=h - 1)[:, :, None, :, None] * w + xs.clamp(max=w - 1)[:, None, :, None, :]
    flat = flat.expand_as(inside).reshape(k, -1)  # [K, PH*PW*SY*SX] pixel index of each window slot
    neg_inf = torch.tensor(float("-inf"), dtype=input.dtype, device=input.device)
    chunk = max(1, _ELEMENTS_PER_CHUNK // (c * flat.size(1)))  # bounds the gathered windows
    image = rois[:, 0].long()
    for start in range(0, k, chunk):
        sl = slice(start, start + chunk)
        planes = input[image[sl]].flatten(2)  # [k, C, H*W]
        idx = flat[sl, None, :].expand(-1, c, -1)
        values = torch.gather(planes, 2, idx).view(-1, c, pooled_height, pooled_width, span_y * span_x)
        values = torch.where(inside[sl, None].flatten(-2), values, neg_inf)
        best, slot = values.max(dim=-1)
        where = torch.gather(idx.view_as(values), 4, slot[..., None])[..., 0]
        empty = ~inside[sl].flatten(-2).any(dim=-1)[:, None]  # [k, 1, PH, PW]
        output[sl] = torch.where(empty, torch.zeros_like(best), best)
        argmax[sl] = torch.where(empty, torch.full_like(where, -1), where)
    return output, argmax


@register_composite("_roi_pool_backward")
def roi_pool_backward_composite(
    grad, rois, argmax, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width
):
    _check_backward_args(grad, rois, argmax, pooled_height, pooled_width, batch_size, channels, height, width)
    grad_input = grad.new_zeros((batch_size, channels, height * width))
    if grad.numel() == 0 or grad_input.numel() == 0:
        return grad_input.view(batch_size, channels, height, width)
    valid = argmax >= 0
    k, c = grad.shape[:2]
    image = rois[:, 0].long()[:, None, None].expand(k, c, pooled_height * pooled_width)
    channel = torch.arange(c, device=grad.device)[None, :, None].expand_as(image)
    flat = (image * channels + channel) * (height * width) + argmax.flatten(2).clamp(min=0)
    contrib = torch.where(valid.flatten(2), grad.flatten(2), torch.zeros_like(grad.flatten(2)))
    grad_input.view(-1).index_add_(0, flat.reshape(-1), contrib.reshape(-1))
    return grad_input.view(batch_size, channels, height, width)
