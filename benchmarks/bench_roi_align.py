"""roi_align: fastdl's kernel against a vectorised eager-PyTorch implementation (and torchvision
when it imports).

The eager baseline is the usual gather formulation (every sample point's four neighbours fetched
with advanced indexing, then weighted and averaged), as written for devices without a kernel.
"""

from __future__ import annotations

import pytest
import torch

import fastdl.ops
from fastdl.ops._library import composite

from ._common import make_run, record, torchvision_ops

# name: (feature map [N, C, H, W], number of boxes, output size, sampling ratio, quick?)
CASES = {
    "fasterrcnn-c4": ((2, 256, 50, 50), 1000, 7, 2, False),
    "small-64ch": ((4, 64, 32, 32), 256, 7, 2, True),
}


def eager_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Vectorised gather implementation (fixed sampling_ratio)."""
    n, c, h, w = input.shape
    ph = pw = output_size
    g = sampling_ratio
    offset = 0.5 if aligned else 0.0
    idx = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1), rh.clamp(min=1)
    steps = (torch.arange(ph * g, device=input.device, dtype=input.dtype) + 0.5) / g
    ys = y1[:, None] + steps[None] * (rh / ph)[:, None]  # [K, PH*G]
    xs = x1[:, None] + steps[None] * (rw / pw)[:, None]  # [K, PW*G]

    def taps(coord, size):
        valid = (coord >= -1) & (coord <= size)
        coord = coord.clamp(min=0)
        low = coord.floor().clamp(max=size - 1)
        coord = torch.where(low >= size - 1, low, coord)
        high = (low + 1).clamp(max=size - 1)
        frac = coord - low
        return low.long(), high.long(), 1 - frac, frac, valid

    y0, y1_, hy, ly, vy = taps(ys, h)
    x0, x1_, hx, lx, vx = taps(xs, w)
    feats = input[idx]  # [K, C, H, W]
    kk = torch.arange(len(idx), device=input.device)[:, None, None]

    def gather(yi, xi):
        return feats.permute(0, 2, 3, 1)[kk, yi[:, :, None], xi[:, None, :]]  # [K, PH*G, PW*G, C]

    val = (
        gather(y0, x0) * (hy[:, :, None] * hx[:, None, :])[..., None]
        + gather(y0, x1_) * (hy[:, :, None] * lx[:, None, :])[..., None]
        + gather(y1_, x0) * (ly[:, :, None] * hx[:, None, :])[..., None]
        + gather(y1_, x1_) * (ly[:, :, None] * lx[:, None, :])[..., None]
    )
    val = val * (vy[:, :, None] & vx[:, None, :])[..., None]
    k = len(idx)
    return val.reshape(k, ph, g, pw, g, c).mean(dim=(2, 4)).permute(0, 3, 1, 2)


def make_inputs(case: str, device: str):
    (n, c, h, w), num_boxes, _, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    scale = 1 / 16
    xy = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w, h]) / scale
    wh = torch.rand(num_boxes, 2, generator=gen) * torch.tensor([w, h]) / scale / 3 + 16
    rois = torch.cat([torch.randint(0, n, (num_boxes, 1), generator=gen).float(), xy, xy + wh], 1)
    return x.to(device), rois.to(device), scale


IMPLS = {
    "fastdl": lambda x, r, o, s, sr, a: fastdl.ops.roi_align(x, r, o, s, sr, a),
    "eager": eager_roi_align,
}
if (tv_ops := torchvision_ops()) is not None:
    IMPLS["torchvision"] = lambda x, r, o, s, sr, a: tv_ops.roi_align(x, r, o, s, sr, a)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=[pytest.mark.quick] if spec[4] else []) for name, spec in CASES.items()]
)
def test_roi_align(benchmark, case, impl, mode, device):
    x, rois, scale = make_inputs(case, device)
    _, _, out_size, sampling, _ = CASES[case]
    fn = IMPLS[impl]
    reference = composite("roi_align")(x.double(), rois.double(), scale, out_size, out_size, sampling, True)
    if mode == "forward+backward":
        x.requires_grad_()
    run = make_run(fn, (x, rois, out_size, scale, sampling, True), mode, device)

    result = benchmark(run)
    record(benchmark, op="roi_align", case=f"{case} {mode}", impl=impl, result=result.detach(), reference=reference)
