"""ROI-align (Mask R-CNN): average of bilinearly sampled points in each output bin."""

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
    suggest_memory_format,
)

__all__ = ["roi_align"]

MAX_SAMPLING_RATIO = 256  # kMaxSamplingRatio in csrc/ops/roi_align/roi_align.h
MAX_ADAPTIVE_GRID = 2**40  # kMaxAdaptiveGrid


def roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Pool each box of ``input`` to a fixed ``output_size`` grid by bilinear sampling.

    Args:
        input: ``Tensor[N, C, H, W]`` feature map, NCHW or channels-last.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of ``N``
            per-image ``Tensor[L, 4]`` rows ``(x1, y1, x2, y2)``. Coordinates are in input-image
            pixels; ``spatial_scale`` maps them onto the feature map.
        output_size: ``(PH, PW)`` or an int for a square grid.
        spatial_scale: feature-map size over image size, e.g. ``1/16`` for a stride-16 map.
        sampling_ratio: sample points per bin along each axis, at most 256; ``<= 0`` picks
            ``ceil(box_size / output_size)`` per box (about one point per feature pixel; only
            the points that can land on the map are visited, so huge boxes cost no more than
            the map).
        aligned: shift boxes by half a pixel so that pixel centres are at ``i + 0.5``
            (``False`` keeps the legacy behaviour, which also forces boxes to at least 1x1).

    Returns:
        ``Tensor[K, C, PH, PW]`` in the memory format of ``input``. Sample points more than one
        pixel outside the map contribute zero; boxes partly outside are handled per point.

    Same semantics as ``torchvision.ops.roi_align``. Differentiable w.r.t. ``input``; the CPU
    backward is deterministic, the CUDA one is deterministic when
    ``torch.use_deterministic_algorithms(True)`` is set. dtypes: float32/float64 on all devices,
    float16/bfloat16 on CUDA.
    """
    rois = boxes_to_rois(boxes, input)
    pooled_height, pooled_width = pair(output_size, "output_size")
    return torch.ops.fastdl.roi_align.default(
        input, rois, float(spatial_scale), pooled_height, pooled_width, int(sampling_ratio), bool(aligned)
    )


def _check_params(pooled_height, pooled_width, spatial_scale, sampling_ratio) -> None:
    """``check_params`` of ``csrc/ops/roi_align/roi_align.h``."""
    check_output_size("roi_align", pooled_height, pooled_width)
    check_spatial_scale("roi_align", spatial_scale)
    torch._check(
        sampling_ratio <= MAX_SAMPLING_RATIO,
        lambda: (
            f"roi_align: sampling_ratio must be at most {MAX_SAMPLING_RATIO} (or <= 0 for the adaptive grid), "
            f"got {sampling_ratio}"
        ),
    )


# ---- fake kernels (shapes only, for torch.compile and meta tensors) --------------------------


@torch.library.register_fake("fastdl::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    check_rois("roi_align", input, rois, check_values=False)
    _check_params(pooled_height, pooled_width, spatial_scale, sampling_ratio)
    shape = (rois.size(0), input.size(1), pooled_height, pooled_width)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input))


@torch.library.register_fake("fastdl::_roi_align_backward")
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    _check_backward_args(
        grad,
        rois,
        spatial_scale,
        pooled_height,
        pooled_width,
        batch_size,
        channels,
        height,
        width,
        sampling_ratio,
        check_values=False,
    )
    return grad.new_empty((batch_size, channels, height, width))


def _check_backward_args(
    grad,
    rois,
    spatial_scale,
    pooled_height,
    pooled_width,
    batch_size,
    channels,
    height,
    width,
    sampling_ratio,
    *,
    check_values: bool = True,
) -> None:
    """``check_backward_args`` of ``csrc/ops/roi_align/roi_align.h``."""
    op = "roi_align_backward"
    _check_params(pooled_height, pooled_width, spatial_scale, sampling_ratio)
    torch._check(grad.device == rois.device, lambda: f"{op}: grad is on {grad.device} but rois is on {rois.device}")
    torch._check(grad.dtype == rois.dtype, lambda: f"{op}: grad has dtype {grad.dtype} but rois has dtype {rois.dtype}")
    if check_values:
        check_backward_rois(op, rois, batch_size, channels, height, width)
    expected = (rois.size(0), channels, pooled_height, pooled_width)
    torch._check(
        tuple(grad.shape) == expected,
        lambda: f"{op}: expected grad of shape {list(expected)}, got {list(grad.shape)}",
    )


# ---- autograd ----------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    ctx.input_shape = input.shape


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    n, c, h, w = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = torch.ops.fastdl._roi_align_backward.default(
            grad, rois, spatial_scale, pooled_height, pooled_width, n, c, h, w, sampling_ratio, aligned
        )
    return grad_input, None, None, None, None, None, None


torch.library.register_autograd("fastdl::roi_align", _backward, setup_context=_setup_context)
register_autocast("roi_align", "float32")


# ---- composite (plain PyTorch; serves MPS and devices without a native kernel) ----------------
#
# Bilinear sampling is separable: the mean over a bin's sample points of
# w_y(y) * w_x(x) * input[y, x] equals Wy[bin_row] @ input @ Wx[bin_col]^T, where Wy[p] (length H)
# sums the y-weights of all sample rows of bin row p, and Wx likewise. So each box costs two small
# matrix products and nothing of size K x C x samples is ever materialised.


def _samples_on_map(bin_start: Tensor, step: Tensor, grid_f: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Per box and bin, the sample indices [begin, end) that can land on the map: the twin of
    ``samples_on_map`` in ``csrc/ops/roi_align/roi_align.h``, same formula and margins.
    ``grid_f`` is the sampling grid per bin as a float tensor shaped like ``bin_start``."""
    first = (-1 - bin_start) / step - 0.5
    last = (size - bin_start) / step - 0.5
    begin = torch.where(first <= 2, 0.0, torch.where(first >= grid_f, grid_f, first.trunc() - 2))
    end = torch.where(last >= grid_f - 3, grid_f, torch.where(last < -2, 0.0, last.trunc() + 3))
    finite = torch.isfinite(step) & torch.isfinite(bin_start)
    positive = step > 0
    begin = torch.where(positive & finite, begin, 0.0)
    end = torch.where(positive, torch.where(finite, end, 0.0), grid_f)  # zero bins: all samples
    begin, end = begin.long(), end.long()
    return begin, torch.maximum(begin, end)


def _axis_weights(start, bin_size, grid, pooled: int, size: int) -> Tensor:
    """Tensor[K, pooled, size]: summed bilinear weights of each bin's sample points on one axis."""
    k = start.size(0)
    bins = torch.arange(pooled, device=start.device, dtype=start.dtype)
    bin_start = start[:, None] + bins[None, :] * bin_size[:, None]  # [K, P]
    grid_f = grid.to(start.dtype)[:, None].expand_as(bin_start)
    divisor = grid_f.clamp(min=1)
    step = bin_size[:, None] / divisor
    begin, end = _samples_on_map(bin_start, step, grid_f, size)
    span = int((end - begin).max()) if k else 0
    index = begin[..., None] + torch.arange(max(span, 1), device=start.device)  # [K, P, S]
    # the C++ expression, term for term, so that both round alike
    coord = bin_start[..., None] + (index.to(start.dtype) + 0.5) * bin_size[:, None, None] / divisor[..., None]
    valid = (index < end[..., None]) & (coord >= -1) & (coord <= size)
    coord = torch.where(valid, coord, 0.0).clamp(min=0)
    low = coord.floor().clamp(max=size - 1)
    at_edge = low >= size - 1
    coord = torch.where(at_edge, low, coord)
    frac = coord - low
    low_i = low.long()
    high_i = torch.where(at_edge, low_i, low_i + 1)
    zero = torch.zeros((), dtype=start.dtype, device=start.device)
    w_low = torch.where(valid, 1 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    weights = start.new_zeros((k, pooled, size))
    weights.scatter_add_(2, low_i.reshape(k, pooled, -1), w_low.reshape(k, pooled, -1))
    weights.scatter_add_(2, high_i.reshape(k, pooled, -1), w_high.reshape(k, pooled, -1))
    return weights


def _adaptive_grid(bin_size: Tensor) -> Tensor:
    n = torch.ceil(bin_size)
    return torch.where(n >= 1, n.clamp(max=MAX_ADAPTIVE_GRID), 0.0).long()  # NaN -> 0, as in C++


def _box_weights(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, height, width):
    """Per-box Wy ``[K, PH, H]`` and Wx ``[K, PW, W]`` with the 1/count of the mean folded in."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = _adaptive_grid(bin_h), _adaptive_grid(bin_w)
    count = grid_h.to(rois.dtype) * grid_w.to(rois.dtype)
    inv_count = torch.where(count > 0, 1 / count.clamp(min=1), torch.zeros_like(count))
    wy = _axis_weights(y1, bin_h, grid_h, pooled_height, height) * inv_count[:, None, None]
    wx = _axis_weights(x1, bin_w, grid_w, pooled_width, width)
    return wy, wx


_BOX_CHUNK = 64  # boxes per matrix product: bounds the [chunk, C, PH, W] intermediate


@register_composite("roi_align")
def roi_align_composite(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    check_rois("roi_align", input, rois)
    _check_params(pooled_height, pooled_width, spatial_scale, sampling_ratio)
    n, c, h, w = input.shape
    out = input.new_zeros((rois.size(0), c, pooled_height, pooled_width))
    if out.numel() == 0 or h == 0 or w == 0:  # no pixels: every sample point contributes zero
        return out.contiguous(memory_format=suggest_memory_format(input))
    wy, wx = _box_weights(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, h, w)
    image = rois[:, 0].long()
    for start in range(0, rois.size(0), _BOX_CHUNK):
        sl = slice(start, start + _BOX_CHUNK)
        x = input[image[sl]]  # [k, C, H, W]
        out[sl] = wy[sl, None] @ x @ wx[sl, None].transpose(-1, -2)
    return out.contiguous(memory_format=suggest_memory_format(input))


@register_composite("_roi_align_backward")
def roi_align_backward_composite(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    _check_backward_args(
        grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio
    )
    grad_input = grad.new_zeros((batch_size, channels, height, width))
    if grad.numel() == 0 or grad_input.numel() == 0:
        return grad_input
    wy, wx = _box_weights(rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned, height, width)
    image = rois[:, 0].long()
    for start in range(0, rois.size(0), _BOX_CHUNK):
        sl = slice(start, start + _BOX_CHUNK)
        per_box = wy[sl, None].transpose(-1, -2) @ grad[sl] @ wx[sl, None]  # [k, C, H, W]
        grad_input.index_add_(0, image[sl], per_box)
    return grad_input
