"""roi_pool: fastdl's kernel against eager PyTorch (fastdl's masked-max composite) and torchvision
when it imports."""

from __future__ import annotations

import pytest

import fastdl.ops
from fastdl.ops._library import composite

from ._common import record, sync, torchvision_ops
from .bench_roi_align import make_inputs

CASES = {"fasterrcnn-c4": False, "small-64ch": True}  # shared with bench_roi_align; value: quick?

IMPLS = {
    "fastdl": lambda x, r, s: fastdl.ops.roi_pool(x, r, 7, s),
    "eager": lambda x, r, s: composite("roi_pool")(x, r, s, 7, 7)[0],
}
if (tv_ops := torchvision_ops()) is not None:
    IMPLS["torchvision"] = lambda x, r, s: tv_ops.roi_pool(x, r, 7, s)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.quick] if q else []) for c, q in CASES.items()])
def test_roi_pool(benchmark, case, impl, device):
    x, rois, scale = make_inputs(case, device)
    reference = fastdl.ops.roi_pool(x.double(), rois.double(), 7, scale)

    def run():
        out = IMPLS[impl](x, rois, scale)
        sync(device)
        return out

    record(benchmark, op="roi_pool", case=f"{case} forward", impl=impl, result=benchmark(run), reference=reference)
