"""fastdl's ops inside PyTorch's tooling: autocast, torch.fx tracing and TorchScript."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import fastdl.nn
import fastdl.ops
from harness import DEVICES, fresh_seed

AUTOCAST_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}


def rois_on(device: str) -> torch.Tensor:
    return torch.tensor([[0, 1.0, 1.0, 10.0, 12.0], [1, 2.0, 3.0, 14.0, 9.0], [0, 0.0, 0.0, 15.0, 15.0]], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_autocast_runs_detection_ops_in_float32(op, device):
    """Low-precision features with float32 boxes, as an AMP detector passes them: the op runs on
    float32 copies and returns the features' dtype (torchvision's rule), and gradients flow."""
    fresh_seed()
    low = AUTOCAST_DTYPES[device]
    features = torch.randn(2, 5, 16, 16, device=device).to(low).requires_grad_()
    rois = rois_on(device)
    call = {
        "roi_align": lambda f: fastdl.ops.roi_align(f, rois, 3, 1.0, 2, True),
        "roi_pool": lambda f: fastdl.ops.roi_pool(f, rois, 3, 1.0),
    }[op]
    with torch.autocast(device, dtype=low):
        out = call(features)
    assert out.dtype == low
    expected = call(features.detach().float())
    torch.testing.assert_close(out.float(), expected.to(low).float())
    out.float().sum().backward()
    assert features.grad is not None and features.grad.dtype == low


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_nms_with_low_precision_boxes(device):
    fresh_seed()
    low = AUTOCAST_DTYPES[device]
    xy = torch.rand(50, 2, device=device) * 400
    boxes = torch.cat([xy, xy + 50 + torch.rand(50, 2, device=device) * 200], 1)
    scores = torch.rand(50, device=device)
    expected = fastdl.ops.nms(boxes.to(low).float(), scores, 0.5)
    with torch.autocast(device, dtype=low):
        assert torch.equal(fastdl.ops.nms(boxes.to(low), scores, 0.5), expected)
        idxs = torch.randint(0, 3, (50,), device=device)
        assert torch.equal(
            fastdl.ops.batched_nms(boxes.to(low), scores, idxs, 0.5),
            fastdl.ops.batched_nms(boxes.to(low).float(), scores, idxs, 0.5),
        )


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_attention_takes_the_autocast_dtype(device):
    """Like scaled_dot_product_attention: float32 inputs run in the autocast dtype."""
    fresh_seed()
    low = AUTOCAST_DTYPES[device]
    q, k, v = (torch.randn(2, 2, 9, 16, device=device, requires_grad=True) for _ in range(3))
    with torch.autocast(device, dtype=low):
        out = fastdl.ops.attention(q, k, v, causal=True)
    assert out.dtype == low
    expected = fastdl.ops.attention(q.to(low), k.to(low), v.to(low), causal=True)
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone():
    features = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rois = rois_on("cpu").double()[:1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastdl.ops.roi_align(features, rois, 2, 1.0, 2, True).dtype == torch.float64


class UsesOps(torch.nn.Module):
    """User code calling the wrappers through the package, with a list of boxes."""

    def forward(self, features, boxes):
        pooled = fastdl.ops.roi_align(features, [boxes], 3, 0.5, 2, True)
        keep = fastdl.ops.nms(boxes, fastdl.ops.box_area(boxes), 0.5)
        return pooled.sum() + keep.numel() + fastdl.ops.box_iou(boxes, boxes).sum()


def test_fx_keeps_the_wrappers_as_leaf_calls():
    fresh_seed()
    traced = torch.fx.symbolic_trace(UsesOps())
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert {fastdl.ops.roi_align, fastdl.ops.nms, fastdl.ops.box_area, fastdl.ops.box_iou} <= targets
    features = torch.randn(1, 3, 20, 20)
    xy = torch.rand(6, 2) * 20
    boxes = torch.cat([xy, xy + 8], 1)
    torch.testing.assert_close(traced(features, boxes), UsesOps()(features, boxes))


@pytest.mark.parametrize(
    "module, inputs",
    [
        (lambda: fastdl.nn.RoIAlign(3, 0.5, 2), lambda: (torch.randn(1, 3, 20, 20), torch.tensor([[0, 1.0, 1, 9, 9]]))),
        (lambda: fastdl.nn.RoIPool(3, 0.5), lambda: (torch.randn(1, 3, 20, 20), torch.tensor([[0, 1.0, 1, 9, 9]]))),
        (lambda: fastdl.nn.Conv2d(3, 4, 3, padding=1), lambda: (torch.randn(2, 3, 8, 8),)),
    ],
    ids=["RoIAlign", "RoIPool", "Conv2d"],
)
def test_fx_traces_the_modules(module, inputs):
    fresh_seed()
    m, args = module(), inputs()
    traced = torch.fx.symbolic_trace(m)
    assert any(
        node.op == "call_function" and node.target.__module__.startswith("fastdl.ops") for node in traced.graph.nodes
    )
    torch.testing.assert_close(traced(*args), m(*args))


def test_torchscript_refuses_the_wrappers_clearly():
    with pytest.raises(RuntimeError, match="fastdl.ops.roi_align cannot be compiled by TorchScript"):
        torch.jit.script(fastdl.ops.roi_align)


@torch.jit.script
def _scripted_roi_align(features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastdl.roi_align(features, rois, 0.5, 3, 3, 2, True)


def test_torchscript_calls_the_registered_operators():
    fresh_seed()
    features, rois = torch.randn(1, 3, 20, 20), torch.tensor([[0, 1.0, 1, 9, 9]])
    torch.testing.assert_close(
        _scripted_roi_align(features, rois), fastdl.ops.roi_align(features, rois, 3, 0.5, 2, True)
    )
