"""fastdl.models: whole ResNets against the same architecture in plain ``torch.nn``: float32,
and on CUDA also float16 and bfloat16 inference (against cuDNN).

Implementations (same weights, same input):

* ``fastdl``: inference runs the fused model (``model.fuse()``: BatchNorm folded, ReLU and the
  residual add in the convolutions' output pass, Winograd weights prepacked); a training step runs
  the unfused fastdl model (fastdl's conv forward and backward).
* ``fastdl-unfused``: the fastdl model in eval mode, not fused (fastdl's convolutions alone).
* ``eager``: the same modules with every convolution a ``torch.nn.Conv2d`` (oneDNN on the CPU).
* ``eager-compiled``: ``torch.compile`` of ``eager`` (inference, full runs only: compiling takes
  minutes on small machines).

``max_abs_err`` is against ``eager`` in float64: the logits for inference, the first step's loss
for a training step.

The GPT-2 and Fast R-CNN cases are described in their own sections below.
"""

from __future__ import annotations

import copy
import functools
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl.nn
from fastdl import models
from fastdl.models.detection import postprocess_detections
from fastdl.models.gpt2 import GPT, GPTConfig, KVCache
from fastdl.ops import boxes as detection_ops

from ._common import peak_mb, record, sync, torchvision_ops
from ._reference_gpt import PlainGPT, transformers_gpt2
from .bench_nms import batched_nms_per_class
from .bench_roi_align import eager_roi_align

# name: (builder, small_input, batch, size, quick?)
INFERENCE_CASES = {
    "resnet18-b8-224": ("resnet18", False, 8, 224, False),
    "resnet18-cifar-b256-32": ("resnet18", True, 256, 32, False),
    "resnet50-b8-224": ("resnet50", False, 8, 224, False),
    "resnet18-b8-64": ("resnet18", False, 8, 64, True),
}
TRAINING_CASES = {
    "resnet18-cifar-b128-32": ("resnet18", True, 128, 32, False),
    "resnet18-cifar-b16-32": ("resnet18", True, 16, 32, True),
}
NUM_CLASSES = 10


def params(cases):
    return [pytest.param(name, marks=[pytest.mark.quick] if spec[-1] else []) for name, spec in cases.items()]


def torch_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every fastdl convolution replaced by a ``torch.nn.Conv2d`` holding
    the same weights: the same network in plain PyTorch."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, fastdl.nn.Conv2d):
                conv = nn.Conv2d(
                    child.in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv)
    return twin


def make_model(builder: str, small_input: bool, device: str) -> nn.Module:
    """A ResNet with trained-looking BatchNorm statistics (random running mean and variance), so
    folding them is not an identity."""
    torch.manual_seed(0)
    model = getattr(models, builder)(num_classes=NUM_CLASSES, small_input=small_input)
    return randomize_batch_norm(model).to(device)


def randomize_batch_norm(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics in every BatchNorm of ``model``, in place."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", ["fastdl", "fastdl-unfused", "eager", "eager-compiled"])
@pytest.mark.parametrize("case", params(INFERENCE_CASES))
def test_inference(benchmark, case, impl, layout, dtype, device, request):
    builder, small_input, batch, size, _ = INFERENCE_CASES[case]
    if impl == "eager-compiled" and request.config.getoption("--quick"):
        pytest.skip("compiling takes minutes: full runs only")
    if dtype != "float32" and device != "cuda":
        pytest.skip("float16/bfloat16 models are a CUDA case")
    model = make_model(builder, small_input, device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    eager = torch_twin(model)
    with torch.no_grad():
        reference = copy.deepcopy(eager).double()(x.double())
    model, eager, x = (t.to(getattr(torch, dtype)) for t in (model, eager, x))
    if layout == "channels_last":
        model, eager = model.to(memory_format=torch.channels_last), eager.to(memory_format=torch.channels_last)
    fn = {
        "fastdl": lambda: model.fuse(),
        "fastdl-unfused": lambda: model,
        "eager": lambda: eager,
        "eager-compiled": lambda: torch.compile(eager),
    }[impl]()

    def run():
        with torch.inference_mode():
            out = fn(x)
        sync(device)
        return out

    run()  # compiles, and keeps the fused model's Winograd transforms
    result = benchmark(run)
    case_name = f"{case} inference {layout}" + ("" if dtype == "float32" else f" {dtype}")
    record(benchmark, op="models", case=case_name, impl=impl, result=result, reference=reference)


def sgd_step(model: nn.Module, device: str):
    """One training step of the notes' recipe (SGD, momentum 0.9, weight decay 5e-4): forward,
    cross-entropy, backward, update. Returns the step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ["fastdl", "eager"])
@pytest.mark.parametrize("case", params(TRAINING_CASES))
def test_training_step(benchmark, case, impl, device):
    builder, small_input, batch, size, _ = TRAINING_CASES[case]
    model = make_model(builder, small_input, device).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    eager = torch_twin(model)
    reference = F.cross_entropy(copy.deepcopy(eager).double()(x.double()), y).detach()
    step = sgd_step(model if impl == "fastdl" else eager, device)
    first_loss = step(x, y)
    benchmark(step, x, y)
    record(benchmark, op="models", case=f"{case} training step", impl=impl, result=first_loss, reference=reference)


# ---- GPT-2 --------------------------------------------------------------------------------------
#
# fastdl's GPT (fastdl attention, fused residual + LayerNorm, fused linear cross-entropy) against
# the same weights in plain torch (``PlainGPT``: SDPA, F.layer_norm, full logits) and in
# ``transformers.GPT2LMHeadModel`` (SDPA attention), dropout off, float32.

# name: (preset, batch, tokens, quick?)
GPT_TRAINING_CASES = {
    "gpt2-b4-256": ("gpt2", 4, 256, False),
    "gpt2-tiny-b4-64": ("gpt2-tiny", 4, 64, True),
}
# name: (preset, batch, prompt tokens, new tokens, quick?)
GPT_GENERATION_CASES = {
    "gpt2-b1-p128-n128": ("gpt2", 1, 128, 128, False),
    "gpt2-b8-p128-n128": ("gpt2", 8, 128, 128, False),
    "gpt2-tiny-b2-p16-n16": ("gpt2-tiny", 2, 16, 16, True),
}


def make_gpt(preset: str, device: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name(preset, dropout=0.0)).to(device)


def gpt_impl(model: GPT, impl: str) -> nn.Module | None:
    """The implementation ``impl`` of ``model``'s network, same weights; None if unavailable."""
    if impl == "fastdl":
        return model
    if impl == "eager":
        plain = PlainGPT(model.config).to(next(model.parameters()).device)
        plain.load_state_dict(model.state_dict())
        return plain
    return transformers_gpt2(model)


def next_token_loss(net: nn.Module, impl: str, idx, targets):
    if impl == "fastdl":
        return net(idx, targets)[1]
    if impl == "eager":
        return net(idx, targets)
    logits = net(input_ids=idx, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("impl", ["fastdl", "eager", "transformers"])
@pytest.mark.parametrize("case", params(GPT_TRAINING_CASES))
def test_gpt_training_step(benchmark, case, impl, device):
    """Forward, loss, backward and ``torch.optim.AdamW(fused=True)``, the same on every side:
    torch's fastest step, so that the optimizer (the same work on every side) dilutes the
    comparison of the models as little as it can."""
    preset, batch, tokens, _ = GPT_TRAINING_CASES[case]
    model = make_gpt(preset, device)
    text = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), generator=torch.Generator().manual_seed(1))
    idx, targets = text[:, :-1].to(device), text[:, 1:].to(device)
    with torch.no_grad():
        reference = gpt_impl(model, "eager").double()(idx, targets)
    net = gpt_impl(model, impl)
    if net is None:
        pytest.skip("transformers is not installed")
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1, fused=device in ("cpu", "cuda"))

    def step():
        loss = next_token_loss(net, impl, idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        return loss.detach()

    first_loss = step()
    benchmark(step)
    record(benchmark, op="models", case=f"{case} training step", impl=impl, result=first_loss, reference=reference)
    if device == "cpu":
        benchmark.extra_info["peak_mb"] = peak_mb(step)


def greedy(net: nn.Module, impl: str, prompt, new_tokens: int):
    """``new_tokens`` greedy tokens after ``prompt``, KV-cached, exactly ``new_tokens`` of them."""
    if impl == "fastdl":
        return net.generate(prompt, new_tokens, temperature=0.0)[:, prompt.size(1) :]
    with torch.inference_mode():
        out = net.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    return out[:, prompt.size(1) :]


def prefill(net: nn.Module, impl: str, prompt):
    """The prompt's forward pass that fills the KV cache, and the first token's logits."""
    with torch.inference_mode():
        if impl == "fastdl":
            cache = KVCache(net.config.n_layer, prompt.size(1) + 1)
            return net.lm_head(net.hidden_states(prompt, None, cache)[:, -1])
        return net(input_ids=prompt, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("stage", ["generate", "prefill"])
@pytest.mark.parametrize("impl", ["fastdl", "transformers"])
@pytest.mark.parametrize("case", params(GPT_GENERATION_CASES))
def test_gpt_generation(benchmark, case, impl, stage, device):
    """Greedy generation with a KV cache (``generate``: prompt, then ``new`` tokens one by one),
    and its prompt pass alone (``prefill``). ``max_abs_err`` is against transformers' tokens (0
    when identical) or its logits."""
    preset, batch, prompt_len, new_tokens, _ = GPT_GENERATION_CASES[case]
    model = make_gpt(preset, device).eval()
    hf = transformers_gpt2(model)
    if hf is None:
        pytest.skip("transformers is not installed")
    hf.eval()
    net = model if impl == "fastdl" else hf
    prompt = torch.randint(
        0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1)
    ).to(device)
    if stage == "generate":
        reference = greedy(hf, "transformers", prompt, new_tokens)
        run = lambda: greedy(net, impl, prompt, new_tokens)  # noqa: E731
    else:
        reference = prefill(hf, "transformers", prompt)
        run = lambda: prefill(net, impl, prompt)  # noqa: E731
    result = run()
    benchmark(run)
    record(benchmark, op="models", case=f"{case} {stage}", impl=impl, result=result, reference=reference)


# ---- Fast R-CNN ---------------------------------------------------------------------------------
#
# The detector of fastdl.models.detection over given proposals, float32, eval with the default
# post-processing (score > 0.05, NMS 0.5 per class, 100 per image). Implementations (same weights,
# images and proposals):
#
# * ``fastdl``: the detector as users run it, its ResNet backbone fused for inference
#   (``ResNet.fuse()``, as the ResNet cases above); a training step runs the unfused detector.
# * ``plain``: the same network in plain torch: ``torch_twin``'s convolutions, RoIAlign as the
#   eager gather of ``bench_roi_align`` (in chunks of RoIs, to bound its memory), and each image
#   post-processed alone with the per-class eager NMS of ``bench_nms``.
# * ``torchvision``: ``plain`` with torchvision's roi_align and batched_nms, when it imports.
# * ``loop``: the course notes' loop over the layers of ``fastdl``: each image through the backbone
#   alone, each RoI pooled and through the head alone, each image post-processed alone
#   (inference, and only on cases with few proposals).
#
# ``max_abs_err`` is against ``plain``: the labels, boxes and scores of the detections, or the
# first step's loss. ``stages_ms`` (extra_info) splits the pass into its stages, medians over the rounds.

IMAGES_384_TO_512 = ((384, 512), (512, 384), (384, 384), (448, 384))  # (height, width) of a batch of 4

# name: (detector builder, image sizes, proposals per image, loop?, quick?)
DETECTION_INFERENCE_CASES = {
    "fastrcnn-r50-b4-p2000": ("fastrcnn_resnet50", IMAGES_384_TO_512, 2000, False, False),
    "fastrcnn-r50-b4-p100": ("fastrcnn_resnet50", IMAGES_384_TO_512, 100, True, False),
    "fastrcnn-r18-b2-p64": ("fastrcnn_resnet18", ((96, 128), (128, 96)), 64, True, True),
}
# name: (detector builder, image sizes, proposals per image, RoIs sampled per image, quick?)
DETECTION_TRAINING_CASES = {
    "fastrcnn-r18-b4-r512": ("fastrcnn_resnet18", IMAGES_384_TO_512, 2000, 512, False),
    "fastrcnn-r18-b2-r32": ("fastrcnn_resnet18", ((96, 128), (128, 96)), 64, 32, True),
}
DETECTION_CLASSES = 21  # 20 object classes and the background, as Pascal VOC
GROUND_TRUTH_PER_IMAGE = 3
EAGER_ROI_CHUNK = 128  # RoIs per eager gather: bounds its [chunk, PH * G, PW * G, C] samples


def make_detector(builder: str, image_sizes, roi_batch: int = 512) -> nn.Module:
    """A detector with trained-looking BatchNorm statistics, resizing nothing (``min_size`` and
    ``max_size`` are the images' own short and long sides)."""
    torch.manual_seed(0)
    detector = getattr(models.detection, builder)(
        DETECTION_CLASSES,
        min_size=min(min(s) for s in image_sizes),
        max_size=max(max(s) for s in image_sizes),
        box_batch_size_per_image=roi_batch,
    )
    randomize_batch_norm(detector)
    return detector


def detection_inputs(image_sizes, num_proposals: int):
    """Images in [0, 1], random proposals of at least 16 px inside each, and a few labelled boxes."""
    gen = torch.Generator().manual_seed(1)

    def boxes(count, height, width):
        xy = torch.rand(count, 2, generator=gen) * torch.tensor([width - 16.0, height - 16.0])
        room = torch.tensor([float(width), float(height)]) - xy - 16
        return torch.cat([xy, xy + 16 + torch.rand(count, 2, generator=gen) * room], 1)

    images = [torch.rand(3, h, w, generator=gen) for h, w in image_sizes]
    proposals = [boxes(num_proposals, h, w) for h, w in image_sizes]
    targets = [
        {
            "boxes": boxes(GROUND_TRUTH_PER_IMAGE, h, w),
            "labels": torch.randint(1, DETECTION_CLASSES, (GROUND_TRUTH_PER_IMAGE,), generator=gen),
        }
        for h, w in image_sizes
    ]
    return images, proposals, targets


class TorchRoIAlign(nn.Module):
    """RoIAlign through a function with torchvision's ``roi_align`` arguments, applied to
    ``EAGER_ROI_CHUNK`` RoIs at a time, with the settings of the fastdl module it replaces."""

    def __init__(self, fastdl_roi_align: nn.Module, roi_align):
        super().__init__()
        self.roi_align = roi_align
        self.output_size = fastdl_roi_align.output_size[0]
        self.spatial_scale = fastdl_roi_align.spatial_scale
        self.sampling_ratio = fastdl_roi_align.sampling_ratio
        self.aligned = fastdl_roi_align.aligned

    def forward(self, features, boxes):
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        return torch.cat(
            [
                self.roi_align(features, chunk, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)
                for chunk in rois.split(EAGER_ROI_CHUNK)
            ]
        )


def per_image_postprocess(batched_nms):
    """torchvision's ``postprocess_detections``: each image alone, NMS by ``batched_nms(boxes,
    scores, labels, threshold)``; called as :func:`postprocess_detections` is."""

    def postprocess(
        class_logits, box_regression, proposals, image_sizes, box_coder, score_thresh, nms_thresh, detections_per_img
    ):
        counts = [len(p) for p in proposals]
        all_boxes = box_coder.decode(box_regression, list(proposals))
        all_scores = F.softmax(class_logits, -1)
        detections = []
        for boxes, scores, size in zip(all_boxes.split(counts), all_scores.split(counts), image_sizes):
            boxes = detection_ops.clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, scores.size(1)).expand(scores.size(0), -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.nonzero(scores > score_thresh).flatten()
            keep = keep[detection_ops.remove_small_boxes(boxes[keep], 1e-2)]
            keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], nms_thresh)][:detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    return postprocess


def detect_in_stages(detector, images, proposals, postprocess, stage_times: dict | None = None):
    """The eval pass of :class:`FastRCNN` written out stage by stage, with ``postprocess`` in the
    place of :func:`postprocess_detections`; each stage's seconds are appended to
    ``stage_times[stage]`` when given."""

    def timed(stage, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        if stage_times is not None:
            stage_times.setdefault(stage, []).append(time.perf_counter() - start)
        return out

    original_sizes = [tuple(image.shape[-2:]) for image in images]
    image_list, proposals, _ = timed("transform", detector.transform, images, proposals)
    features = timed("backbone", detector.backbone, image_list.tensors)
    pooled = timed("roi_align", detector.box_roi_pool, features, proposals)
    logits, deltas = timed("head", lambda x: detector.box_predictor(detector.box_head(x)), pooled)

    def finish():
        detections = postprocess(
            logits,
            deltas,
            proposals,
            image_list.image_sizes,
            detector.box_coder,
            detector.score_thresh,
            detector.nms_thresh,
            detector.detections_per_img,
        )
        return detector.transform.postprocess(detections, image_list.image_sizes, original_sizes)

    return timed("postprocess", finish)


def loop_detect(detector, images, proposals):
    """The course notes' loop over ``detector``'s layers: image by image, RoI by RoI."""
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    image_list, proposals, _ = detector.transform(images, proposals)
    detections = []
    for slot, boxes, size in zip(image_list.tensors, proposals, image_list.image_sizes):
        features = detector.backbone(slot[None])
        outputs = [
            detector.box_predictor(detector.box_head(detector.box_roi_pool(features, [box[None]]))) for box in boxes
        ]
        logits, deltas = (torch.cat(parts) for parts in zip(*outputs))
        detections += postprocess_detections(
            logits,
            deltas,
            [boxes],
            [size],
            detector.box_coder,
            detector.score_thresh,
            detector.nms_thresh,
            detector.detections_per_img,
        )
    return detector.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def fused_detector(detector: nn.Module, builder: str) -> nn.Module:
    """An eval copy of ``detector`` whose ResNet backbone is ``ResNet.fuse()``-d."""
    resnet = getattr(models, builder.removeprefix("fastrcnn_"))()
    resnet.load_state_dict({**resnet.state_dict(), **detector.backbone.state_dict()})
    fused = copy.deepcopy(detector).eval()
    fused.backbone = models.detection.ResNetBackbone(resnet.fuse())
    return fused


def plain_detector(detector: nn.Module, roi_align) -> nn.Module:
    """``detector`` in plain torch (its RoIAlign through ``roi_align``)."""
    plain = torch_twin(detector)
    plain.box_roi_pool = TorchRoIAlign(detector.box_roi_pool, roi_align)
    return plain


def detector_impl(detector: nn.Module, builder: str, impl: str):
    """``impl``'s eval pass of ``detector``: ``run(images, proposals, stage_times=None)``, or None
    when unavailable."""
    if impl == "fastdl":
        fused = fused_detector(detector, builder)
        return lambda images, proposals, stage_times=None: (
            fused(images, proposals)
            if stage_times is None
            else detect_in_stages(fused, images, proposals, postprocess_detections, stage_times)
        )
    if impl == "loop":
        fused = fused_detector(detector, builder)
        return lambda images, proposals, stage_times=None: loop_detect(fused, images, proposals)
    if impl == "plain":
        plain = plain_detector(detector, eager_roi_align).eval()
        postprocess = per_image_postprocess(batched_nms_per_class)
    else:
        if (tv_ops := torchvision_ops()) is None:
            return None
        plain = plain_detector(detector, tv_ops.roi_align).eval()
        postprocess = per_image_postprocess(tv_ops.batched_nms)
    return lambda images, proposals, stage_times=None: detect_in_stages(
        plain, images, proposals, postprocess, stage_times
    )


def detections_tensor(detections) -> torch.Tensor:
    """Every image's detections as rows (label, x1, y1, x2, y2, score), sorted by label, then box:
    the random detectors' scores saturate at 1.0, and each implementation orders equal scores its
    own way."""
    rows = []
    for d in detections:
        image_rows = torch.cat([d["labels"][:, None].to(d["boxes"].dtype), d["boxes"], d["scores"][:, None]], 1)
        for column in reversed(range(5)):  # stable sorts, last key first: a lexicographic order
            image_rows = image_rows[torch.sort(image_rows[:, column], stable=True).indices]
        rows.append(image_rows)
    return torch.cat(rows)


@functools.cache
def plain_detections(case: str) -> torch.Tensor:
    """``plain``'s detections on ``case`` (the reference), computed once per session."""
    builder, image_sizes, num_proposals, _, _ = DETECTION_INFERENCE_CASES[case]
    images, proposals, _ = detection_inputs(image_sizes, num_proposals)
    run = detector_impl(make_detector(builder, image_sizes), builder, "plain")
    with torch.inference_mode():
        return detections_tensor(run(images, proposals))


def record_stages(benchmark, stage_times: dict) -> None:
    benchmark.extra_info["stages_ms"] = {
        stage: round(statistics.median(seconds) * 1e3, 2) for stage, seconds in stage_times.items()
    }


STAGE_ROUNDS = 3  # extra stage-timed passes of fastdl (the benchmark times its real forward)


@pytest.mark.parametrize("impl", ["fastdl", "plain", "torchvision", "loop"])
@pytest.mark.parametrize("case", params(DETECTION_INFERENCE_CASES))
def test_detection_inference(benchmark, case, impl, device):
    builder, image_sizes, num_proposals, loop, _ = DETECTION_INFERENCE_CASES[case]
    if device != "cpu":
        pytest.skip("the detection cases run on the CPU")
    if impl == "loop" and not loop:
        pytest.skip("the RoI-by-RoI loop runs only on the cases with few proposals")
    run = detector_impl(make_detector(builder, image_sizes), builder, impl)
    if run is None:
        pytest.skip("torchvision does not import")
    images, proposals, _ = detection_inputs(image_sizes, num_proposals)
    stage_times = {} if impl in ("plain", "torchvision") else None

    def detect():
        with torch.inference_mode():
            return run(images, proposals, stage_times)

    if impl in ("fastdl", "loop"):
        detect()  # the fused convolutions prepare their Winograd weights on the first call
    result = benchmark(detect)
    record(
        benchmark,
        op="models",
        case=f"{case} detection",
        impl=impl,
        result=detections_tensor(result),
        reference=plain_detections(case),
    )
    benchmark.extra_info["detections"] = sum(len(d["scores"]) for d in result)
    if impl == "fastdl":
        stage_times = {}
        with torch.inference_mode():
            for _ in range(STAGE_ROUNDS):
                staged = detections_tensor(run(images, proposals, stage_times))
        torch.testing.assert_close(staged, detections_tensor(result), rtol=0, atol=0)
    if stage_times is not None:
        record_stages(benchmark, stage_times)


def detection_sgd_step(detector: nn.Module):
    """One training step of the detector (SGD as ``sgd_step``), the RoI sample drawn from the
    same seed every step, so that every implementation trains on the same RoIs."""
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(images, proposals, targets):
        torch.manual_seed(0)
        loss = sum(detector(images, proposals, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


@pytest.mark.parametrize("impl", ["fastdl", "plain", "torchvision"])
@pytest.mark.parametrize("case", params(DETECTION_TRAINING_CASES))
def test_detection_training_step(benchmark, case, impl, device):
    builder, image_sizes, num_proposals, roi_batch, _ = DETECTION_TRAINING_CASES[case]
    if device != "cpu":
        pytest.skip("the detection cases run on the CPU")
    detector = make_detector(builder, image_sizes, roi_batch).train()
    roi_align = {"plain": eager_roi_align, "torchvision": getattr(torchvision_ops(), "roi_align", None)}.get(impl)
    if impl == "torchvision" and roi_align is None:
        pytest.skip("torchvision does not import")
    images, proposals, targets = detection_inputs(image_sizes, num_proposals)
    reference_detector = plain_detector(detector, eager_roi_align)
    with torch.no_grad():
        torch.manual_seed(0)  # after building the plain copy, whose new Conv2d modules draw numbers
        reference = sum(reference_detector(images, proposals, targets).values())
    step = detection_sgd_step(detector if impl == "fastdl" else plain_detector(detector, roi_align))
    first_loss = step(images, proposals, targets)
    benchmark(step, images, proposals, targets)
    record(
        benchmark,
        op="models",
        case=f"{case} detection training step",
        impl=impl,
        result=first_loss,
        reference=reference,
    )
