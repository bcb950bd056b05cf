"""The child-process side of the fuzz suite (tests/test_fuzz.py).

A case is a plain dict (picklable, printable): ``op``, ``seed``, the op's arguments, and
``expect`` = ``None`` for valid input or the name of the argument that a mutation broke.
:func:`run` builds the tensors from it, calls fastdl, and compares with the op's reference:
the plain-PyTorch composite, or torch itself where torch has the op. It returns
``("ok", "")`` or ``("mismatch", details)`` or ``("error", "TypeName: message")``; the parent
decides what each means, and notices crashes and hangs, which no return can report.
"""

from __future__ import annotations

import ctypes
import traceback

import torch
import torch.nn.functional as F

import fastdl.nn
import fastdl.ops
from fastdl.ops._library import composite


def _generator(case) -> torch.Generator:
    return torch.Generator().manual_seed(case["seed"])


def _randn(gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _same(actual, expected, rtol, atol, what) -> str:
    """ "" when equal within tolerance, with NaN where the reference has NaN; else the details."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        return f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    if not torch.equal(torch.isnan(actual), torch.isnan(expected)):
        return f"{what}: NaN at other places than in the reference ({int(torch.isnan(actual).sum())} vs {int(torch.isnan(expected).sum())})"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
        diff = (actual - expected).abs().nan_to_num(0.0).max()
        return f"{what}: max abs difference {float(diff):.3g} (rtol {rtol}, atol {atol})"
    return ""


def _tolerance(dtype):
    return (1e-4, 1e-5) if dtype == torch.float32 else (1e-9, 1e-10)


# ---- the ops: each builds its inputs from the case and returns "" or the mismatch -------------


def _rois(case, gen, dtype):
    n, k = case["batch"], case["boxes"]
    corners = torch.rand((k, 4), generator=gen, dtype=torch.float64) * case["box_range"] - case["box_range"] / 4
    corners = torch.cat([corners[:, :2].minimum(corners[:, 2:]), corners[:, :2].maximum(corners[:, 2:])], 1)
    index = torch.randint(0, max(n, 1), (k, 1), generator=gen).double()
    rois = torch.cat([index, corners], 1).to(dtype)
    for row, col, value in case.get("poison_rois", ()):
        if row < k:
            rois[row, col] = value
    return rois


def _feature_map(case, gen, dtype):
    x = _randn(gen, (case["batch"], case["channels"], case["height"], case["width"]), dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def run_roi_align(case):
    dtype = case["dtype"]
    gen = _generator(case)
    x, rois = _feature_map(case, gen, dtype), _rois(case, gen, dtype)
    args = (
        case["spatial_scale"],
        case["output_size"][0],
        case["output_size"][1],
        case["sampling_ratio"],
        case["aligned"],
    )
    out = fastdl.ops.roi_align(x, rois, case["output_size"], *args[:1], args[3], args[4])
    rtol, atol = _tolerance(dtype)
    problem = _same(out, composite("roi_align")(x, rois, *args), rtol, atol, "roi_align")
    if problem or out.numel() == 0:
        return problem
    grad = _randn(gen, out.shape, dtype)
    n, c, h, w = x.shape
    native = torch.ops.fastdl._roi_align_backward(grad, rois, args[0], args[1], args[2], n, c, h, w, args[3], args[4])
    reference = composite("_roi_align_backward")(grad, rois, args[0], args[1], args[2], n, c, h, w, args[3], args[4])
    return _same(native, reference, rtol, atol, "roi_align backward")


def run_roi_pool(case):
    dtype = case["dtype"]
    gen = _generator(case)
    x, rois = _feature_map(case, gen, dtype), _rois(case, gen, dtype)
    out, argmax = torch.ops.fastdl.roi_pool(x, rois, case["spatial_scale"], *case["output_size"])
    ref_out, ref_argmax = composite("roi_pool")(x, rois, case["spatial_scale"], *case["output_size"])
    problem = _same(out, ref_out, 0, 0, "roi_pool")
    if not problem and not torch.equal(argmax, ref_argmax):
        problem = "roi_pool: argmax differs from the reference"
    return problem


def _nms_inputs(case, gen):
    dtype, n = case["dtype"], case["count"]
    corners = torch.rand((n, 4), generator=gen, dtype=torch.float64) * 100
    boxes = torch.cat([corners[:, :2], corners[:, :2] + corners[:, 2:] / 2], 1) * case["coordinate_scale"]
    scores = torch.randint(0, case["distinct_scores"], (n,), generator=gen).double() / case["distinct_scores"]
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    for row, col, value in case.get("poison_boxes", ()):
        if row < n:
            boxes[row, col] = value
    for row, value in case.get("poison_scores", ()):
        if row < n:
            scores[row] = value
    classes = torch.randint(0, case["classes"], (n,), generator=gen)
    return boxes, scores, classes


def run_nms(case):
    boxes, scores, classes = _nms_inputs(case, _generator(case))
    threshold = case["iou_threshold"]
    if case["batched"]:
        keep = fastdl.ops.batched_nms(boxes, scores, classes, threshold, score_threshold=case.get("score_threshold"))
        reference = composite("batched_nms")(boxes, scores, classes, threshold)
    else:
        keep = fastdl.ops.nms(boxes, scores, threshold, score_threshold=case.get("score_threshold"))
        reference = composite("nms")(boxes, scores, threshold)
    if case.get("score_threshold") is not None:
        reference = reference[scores[reference] >= case["score_threshold"]]
    return "" if torch.equal(keep, reference) else f"nms: kept {keep.tolist()}, reference {reference.tolist()}"


def run_conv2d(case):
    dtype = case["dtype"]
    gen = _generator(case)
    groups = case["groups"]
    x = _randn(gen, (case["batch"], case["in_channels"], case["height"], case["width"]), dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    weight = _randn(gen, (case["out_channels"], case["in_channels"] // max(groups, 1), *case["kernel"]), dtype)
    bias = _randn(gen, (case["out_channels"],), dtype) if case["bias"] else None
    kwargs = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=groups)
    out = fastdl.ops.conv2d(x, weight, bias, **kwargs)
    if case["in_channels"] == 0:  # the empty sum plus bias (torch returns 0 output channels here)
        shape_only = {**kwargs, "groups": 1}
        zeros = F.conv2d(
            x.new_zeros((x.size(0), 1, *x.shape[2:])).double(),
            weight.new_zeros((weight.size(0), 1, *case["kernel"])).double(),
            **shape_only,
        )
        reference = zeros + (0.0 if bias is None else bias.double()[:, None, None])
    else:
        reference = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), **kwargs)
    rtol, atol = (1e-3, 1e-4) if dtype == torch.float32 else (1e-9, 1e-10)
    return _same(out, reference, rtol, atol, "conv2d")


def run_attention(case):
    dtype = case["dtype"]
    gen = _generator(case)
    b, h, nq, nk, d = case["batch"], case["heads"], case["queries"], case["keys"], case["head_dim"]
    q, k, v = (_randn(gen, (b, h, n, d), dtype) for n in (nq, nk, nk))
    for name, index, value in case.get("poison", ()):
        t = {"q": q, "k": k, "v": v}[name]
        if t.numel():
            t.view(-1)[index % t.numel()] = value
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand((nq, nk), generator=gen) > 0.3
    elif case["mask"] == "float":
        mask = _randn(gen, (nq, nk), dtype)
        for index, value in case.get("mask_values", ()):
            if mask.numel():
                mask.view(-1)[index % mask.numel()] = value
    scale = case.get("scale")
    out = fastdl.ops.attention(q, k, v, attn_mask=mask, causal=case["causal"], scale=scale)
    used_scale = scale if scale is not None else 1.0 / d**0.5
    reference, _ = composite("attention")(q, k, v, mask, case["causal"], used_scale, 0.0, 0)
    rtol, atol = (2e-4, 2e-5) if dtype == torch.float32 else (1e-9, 1e-10)
    return _same(out, reference, rtol, atol, "attention")


def run_lstm(case):
    gen = _generator(case)
    torch.manual_seed(case["seed"])
    ours = fastdl.nn.LSTM(
        case["input_size"], case["hidden"], num_layers=case["layers"], batch_first=case["batch_first"]
    )
    theirs = torch.nn.LSTM(
        case["input_size"], case["hidden"], num_layers=case["layers"], batch_first=case["batch_first"]
    )
    theirs.load_state_dict(ours.state_dict())
    shape = (case["batch"], case["steps"]) if case["batch_first"] else (case["steps"], case["batch"])
    x = _randn(gen, (*shape, case["feature_size"]), torch.float32)
    out, (h, c) = ours(x)
    ref, (ref_h, ref_c) = theirs(x)
    return (
        _same(out, ref, 1e-4, 1e-5, "lstm")
        or _same(h, ref_h, 1e-4, 1e-5, "lstm h_n")
        or _same(c, ref_c, 1e-4, 1e-5, "lstm c_n")
    )


def run_layer_norm(case):
    dtype = case["dtype"]
    gen = _generator(case)
    x = _randn(gen, (case["rows"], case["features"]), dtype)
    weight, bias = _randn(gen, (case["weight_size"],), dtype), _randn(gen, (case["features"],), dtype)
    out = fastdl.ops.layer_norm(x, (case["features"],), weight, bias, eps=case["eps"])
    reference = F.layer_norm(x.double(), (case["features"],), weight.double(), bias.double(), eps=case["eps"])
    rtol, atol = _tolerance(dtype)
    return _same(out, reference, rtol * 10, atol * 10, "layer_norm")


def run_linear(case):
    dtype = case["dtype"]
    gen = _generator(case)
    x = _randn(gen, (case["rows"], case["features"]), dtype)
    weight = _randn(gen, (case["outputs"], case["weight_features"]), dtype)
    bias = _randn(gen, (case["bias_size"],), dtype) if case["bias_size"] is not None else None
    out = fastdl.ops.linear(x, weight, bias)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    rtol, atol = _tolerance(dtype)
    return _same(out, reference, rtol * 10, atol * 10, "linear")


def run_linear_cross_entropy(case):
    gen = _generator(case)
    n, e, v = case["rows"], case["width"], case["vocab"]
    hidden, weight = _randn(gen, (n, e), torch.float32), _randn(gen, (case["weight_rows"], e), torch.float32)
    target = torch.randint(0, max(v, 1), (n,), generator=gen)
    for row, value in case.get("poison_target", ()):
        if row < n:
            target[row] = value
    loss = fastdl.ops.linear_cross_entropy(hidden, weight, target, reduction=case["reduction"])
    reference = F.cross_entropy(hidden.double() @ weight.double().T, target, reduction=case["reduction"])
    return _same(loss, reference, 1e-4, 1e-4, "linear_cross_entropy")


def run_boxes(case):
    gen = _generator(case)
    boxes = (torch.rand((case["count"], 4), generator=gen) * 50).to(case["dtype"])
    boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)
    clipped = fastdl.ops.clip_boxes_to_image(boxes, case["size"])
    kept = fastdl.ops.remove_small_boxes(boxes, case["min_size"])
    h, w = case["size"]
    expected = torch.stack(
        [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1
    )
    wh = boxes[:, 2:] - boxes[:, :2]
    small = torch.nonzero((wh >= case["min_size"]).all(1)).flatten()
    return _same(clipped, expected, 0, 0, "clip_boxes_to_image") or (
        "" if torch.equal(kept, small) else "remove_small_boxes differs"
    )


def crash(case):
    """A real segfault (a read of address 0), the parent's self-test of its isolation; under
    the sanitizers ASan reports it and ends the child, as it would a kernel's bad read."""
    ctypes.string_at(0)


RUNNERS = {
    "__crash__": crash,
    "roi_align": run_roi_align,
    "roi_pool": run_roi_pool,
    "nms": run_nms,
    "conv2d": run_conv2d,
    "attention": run_attention,
    "lstm": run_lstm,
    "layer_norm": run_layer_norm,
    "linear": run_linear,
    "linear_cross_entropy": run_linear_cross_entropy,
    "boxes": run_boxes,
}


def run(case) -> tuple[str, str]:
    try:
        problem = RUNNERS[case["op"]](case)
    except Exception as error:  # the parent checks that invalid input raised, and named what
        message = str(error).strip().splitlines()
        return "error", f"{type(error).__name__}: {message[0] if message else ''}"
    except BaseException:
        return "error", traceback.format_exc(limit=2)
    return ("mismatch", problem) if problem else ("ok", "")


def serve(connection) -> None:
    """The child's loop: run each case the parent sends until it sends None."""
    torch.set_num_threads(2)
    while True:
        case = connection.recv()
        if case is None:
            return
        connection.send(run(case))
