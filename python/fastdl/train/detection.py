"""Training and running a Fast R-CNN detector: :func:`fit_detector` (``fastdl train fast-rcnn``),
COCO evaluation through pycocotools, and :class:`Detector` (``fastdl detect``).

One epoch: every rank draws the same shuffled global batches and the same augmentation for
each (horizontal flips, jittered copies of the ground-truth boxes), then decodes and trains on
its own contiguous share (:func:`~fastdl.train.distributed.shard_range`). The proposals of an
image are sliding windows over it (:class:`WindowProposals`); in training the jittered boxes
join them, and the model adds the ground truth itself and samples ``--proposals`` RoIs. After
the epoch each rank detects on its share of the test split, rank 0 gathers the detections and
scores them with pycocotools' ``COCOeval`` (mAP@[.5:.95] and AP50; VOC's difficult and COCO's
crowd objects are ignored as COCO ignores crowds), and writes ``last.pt``, ``best.pt`` (best
mAP so far), ``metrics.json`` and ``curves.png``; at the end ``predictions.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import models
from ..data.coco import COCODetection
from ..data.detection import DetectionDataset, DetectionSubset, ignored_objects
from ..data.shapes import Shapes
from ..data.voc import VOCDetection
from ..models.detection import FastRCNN, ResNetBackbone, SlidingWindowProposals, resize_boxes
from . import checkpoint, distributed, plots
from .config import ConfigError
from .datasets import evenly_spaced
from .detection_cli import DETECTION_RECIPE_FIELDS, MAY_CHANGE, DetectionDataSpec, DetectionTrainConfig
from .loop import run_in_process_group
from .model import wrap_model
from .progress import format_duration, progress_bar

__all__ = [
    "fit_detector",
    "DetectionResult",
    "DetectionData",
    "load_detection_data",
    "build_detector",
    "WindowProposals",
    "Detector",
    "load_detector",
    "evaluate_detector",
    "coco_evaluate",
    "draw_detections",
    "FORMAT",
]

FORMAT = "fastdl.train.fast-rcnn/1"
ASPECT_RATIOS = (0.5, 1.0, 2.0)
SHAPES_SIZES = {"train": 1000, "test": 200}  # images generated when --limit-train/--limit-test are not given
SHAPES_SEEDS = {"train": 0, "test": 1}  # the data is fixed: --seed changes the training, not the images
TEST_EVERY = 5  # a single annotated set is split: every 5th image is a test image
JITTER = 0.1  # the spread of a jittered box's centre (in box sides) and of its log side lengths
PREDICTION_IMAGES = 16


# ---- data --------------------------------------------------------------------------------------------


@dataclass
class DetectionData:
    """The two splits of a run and the class names (label ``k`` is ``classes[k - 1]``)."""

    train: DetectionDataset
    test: DetectionDataset
    classes: list[str]
    source: str  # how the splits were found, for the log


def _limited(dataset: DetectionDataset, limit: int | None) -> DetectionDataset:
    chosen = evenly_spaced(len(dataset), limit)
    return dataset if chosen is None else DetectionSubset(dataset, chosen.tolist())


def _split(dataset: DetectionDataset) -> tuple[DetectionDataset, DetectionDataset]:
    test = [i for i in range(len(dataset)) if i % TEST_EVERY == TEST_EVERY - 1]
    train = [i for i in range(len(dataset)) if i % TEST_EVERY != TEST_EVERY - 1]
    if not test:
        raise ValueError(
            f"{len(dataset)} annotated images are too few to split into train and test "
            f"(every {TEST_EVERY}th image is a test image)"
        )
    return DetectionSubset(dataset, train), DetectionSubset(dataset, test)


def _voc_splits(root: Path) -> tuple[DetectionDataset, DetectionDataset, str]:
    for voc_root in (root, *(child for child in sorted(root.iterdir()) if (child / "Annotations").is_dir())):
        main = voc_root / "ImageSets" / "Main"
        if (main / "train.txt").is_file() and ((main / "val.txt").is_file() or (main / "test.txt").is_file()):
            train_split = "trainval" if (main / "test.txt").is_file() and (main / "trainval.txt").is_file() else "train"
            test_split = "test" if (main / "test.txt").is_file() else "val"
            train = VOCDetection(voc_root, train_split)
            return (
                train,
                VOCDetection(voc_root, test_split, classes=train.classes),
                f"ImageSets/Main/{train_split}.txt and {test_split}.txt",
            )
    for test_name in ("test", "val"):
        if (root / "train").is_dir() and (root / test_name).is_dir():
            train = VOCDetection(root / "train")
            return train, VOCDetection(root / test_name, classes=train.classes), f"train/ and {test_name}/"
    train, test = _split(VOCDetection(root))
    return train, test, f"one set, every {TEST_EVERY}th image for testing"


def load_detection_data(
    spec: DetectionDataSpec, limit_train: int | None = None, limit_test: int | None = None, image_size: int = 96
) -> DetectionData:
    """Both splits of ``spec``, limited to ``limit_*`` images (evenly spaced).

    - ``voc``: ``ImageSets/Main`` train/val (or trainval/test) lists when there are, else
      ``train/`` and ``test/`` (or ``val/``) subfolders, else one set split 4:1.
    - ``coco``: the test annotation file when given, else one set split 4:1.
    - ``shapes``: :class:`~fastdl.data.shapes.Shapes` of ``image_size``, 1000 and 200 images
      unless limited (seeds 0 and 1).

    A reader's error (a missing folder, a damaged file) comes back as a :class:`ConfigError`
    naming ``--data``.
    """
    shown = spec.kind if not spec.paths else f"{spec.kind}={','.join(spec.paths)}"
    try:
        if spec.kind == "shapes":
            train = Shapes(limit_train or SHAPES_SIZES["train"], image_size, seed=SHAPES_SEEDS["train"])
            test = Shapes(limit_test or SHAPES_SIZES["test"], image_size, seed=SHAPES_SEEDS["test"])
            return DetectionData(train, test, train.classes, f"generated, {image_size}x{image_size}")
        if spec.kind == "voc":
            train, test, source = _voc_splits(Path(spec.paths[0]))
        else:
            everything = COCODetection(spec.paths[0], spec.paths[1])
            if len(spec.paths) == 4:
                train, test = everything, COCODetection(spec.paths[2], spec.paths[3])
                if test.classes != train.classes:
                    raise ValueError(f"{spec.paths[3]} has other categories than {spec.paths[1]}")
                source = "the two annotation files"
            else:
                train, test = _split(everything)
                source = f"one set, every {TEST_EVERY}th image for testing"
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"--data {shown}: {error}") from error
    return DetectionData(_limited(train, limit_train), _limited(test, limit_test), list(train.classes), source)


def _describe(data: DetectionData, spec: DetectionDataSpec) -> str:
    def objects(dataset):
        return sum(int(target["boxes"].size(0)) for target in dataset.targets)

    where = spec.kind if not spec.paths else f"{spec.kind} ({', '.join(os.path.abspath(p) for p in spec.paths)})"
    return (
        f"data: {where}, {data.source}: {len(data.train)} train images ({objects(data.train)} objects) / "
        f"{len(data.test)} test images ({objects(data.test)} objects), {len(data.classes)} classes: "
        + ", ".join(data.classes)
    )


# ---- the model and its proposals --------------------------------------------------------------------


class WindowProposals:
    """Sliding windows (:class:`~fastdl.models.detection.SlidingWindowProposals`, aspect ratios
    0.5, 1, 2) laid over the image as the network sees it, resized by ``transform``, and
    returned in the original image's pixels, so that an image's windows follow its resized
    size, whatever its size on disk.

    ``proposals(height, width) -> Tensor[L, 4]`` (float32 xyxy, cached per size).
    """

    def __init__(self, sizes: Sequence[float], stride: int, transform: nn.Module):
        self.windows = SlidingWindowProposals(sizes, ASPECT_RATIOS, stride)
        self.transform = transform
        self._cache: dict[tuple[int, int], Tensor] = {}

    def __call__(self, height: int, width: int) -> Tensor:
        key = (height, width)
        if key not in self._cache:
            resized = self.transform.target_size(height, width)
            self._cache[key] = resize_boxes(self.windows.for_image(*resized), resized, key)
        return self._cache[key]


def model_settings(config: DetectionTrainConfig, spec: DetectionDataSpec, num_classes: int) -> dict:
    """What :func:`build_detector` needs, as stored in the checkpoints (plain values)."""
    min_size = config.image_min_size(spec)
    stride = 2 ** (config.stages + 1)  # the ResNet stem (4) and each stage after the first (2)
    return {
        "backbone": config.backbone,
        "stages": config.stages,
        "num_classes": num_classes,
        "min_size": min_size,
        "max_size": config.max_size,
        "roi_size": config.roi_size,
        "head_size": config.head_size,
        "rois_per_image": config.proposals,
        "window_sizes": [round(fraction * min_size, 2) for fraction in config.window_sizes],
        "window_stride": config.window_stride or stride,
    }


def build_detector(
    settings: dict, backbone_weights: str | os.PathLike | None = None
) -> tuple[FastRCNN, WindowProposals]:
    """The network of ``settings`` (:func:`model_settings`), freshly initialised from torch's
    global generator (seed it first), with the backbone's weights from ``backbone_weights``
    if given; and its proposals."""
    resnet = {"resnet18": models.resnet18, "resnet50": models.resnet50}[settings["backbone"]]
    weights = os.path.expanduser(backbone_weights) if backbone_weights else None
    try:
        backbone = ResNetBackbone(resnet(weights=weights), num_stages=settings["stages"])
    except ValueError as error:  # the weights do not fit (fastdl.models names the keys)
        raise ConfigError(f"--backbone-weights {backbone_weights}: {error}") from error
    net = FastRCNN(
        backbone,
        settings["num_classes"],
        output_size=settings["roi_size"],
        representation_size=settings["head_size"],
        min_size=settings["min_size"],
        max_size=settings["max_size"],
        box_batch_size_per_image=settings["rois_per_image"],
        size_divisible=backbone.stride,
    )
    return net, WindowProposals(settings["window_sizes"], settings["window_stride"], net.transform)


def _jittered(boxes: Tensor, noise: Tensor, height: int, width: int) -> Tensor:
    """Copies of ``boxes [M, 4]`` moved and scaled by ``noise [M, K, 4]`` (standard normal):
    centre by ``JITTER`` box sides, sides by a factor ``exp(JITTER * n)``; ``Tensor[M * K, 4]``
    clipped to the image, degenerate ones dropped."""
    if boxes.numel() == 0 or noise.size(1) == 0:
        return boxes.new_zeros((0, 4))
    size = (boxes[:, 2:] - boxes[:, :2])[:, None, :]
    centre = (boxes[:, :2] + boxes[:, 2:])[:, None, :] / 2 + JITTER * noise[..., :2] * size
    half = size * torch.exp(JITTER * noise[..., 2:]) / 2
    copies = torch.cat([centre - half, centre + half], dim=-1).reshape(-1, 4)
    copies = torch.stack(
        [
            copies[:, 0].clamp(0, width),
            copies[:, 1].clamp(0, height),
            copies[:, 2].clamp(0, width),
            copies[:, 3].clamp(0, height),
        ],
        dim=1,
    )
    return copies[(copies[:, 2] - copies[:, 0] >= 1) & (copies[:, 3] - copies[:, 1] >= 1)]


# ---- evaluation --------------------------------------------------------------------------------------


def _quiet():
    """pycocotools prints its progress: keep it off the run's output."""
    return contextlib.redirect_stdout(io.StringIO())


def _require_pycocotools() -> None:
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise ConfigError("evaluating detections needs pycocotools (COCO mAP): pip install pycocotools") from None


def coco_ground_truth(dataset: DetectionDataset):
    """``dataset``'s boxes as a pycocotools ``COCO`` object: image ids are the dataset's indices,
    category ids the labels, and ignored objects (VOC's difficult, COCO's crowds) are crowds."""
    from pycocotools.coco import COCO

    annotations = []
    for index, target in enumerate(dataset.targets):
        for (x1, y1, x2, y2), label, ignored in zip(
            target["boxes"].tolist(), target["labels"].tolist(), ignored_objects(target).tolist()
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(ignored),
                }
            )
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": index, "height": h, "width": w} for index, (h, w) in enumerate(dataset.image_sizes)],
        "annotations": annotations,
        "categories": [{"id": label, "name": name} for label, name in enumerate(dataset.classes, 1)],
    }
    with _quiet():
        ground_truth.createIndex()
    return ground_truth


def coco_evaluate(ground_truth, detections: Sequence[dict], classes: Sequence[str]) -> dict:
    """Score ``detections`` (per image of ``ground_truth``, in its order: dicts of ``boxes``
    ``Tensor[D, 4]`` xyxy, ``labels``, ``scores``) with pycocotools' ``COCOeval`` (bbox).

    Returns ``map`` (AP@[.5:.95], ``stats[0]``), ``ap50`` (``stats[1]``), ``per_class``
    (name -> ``{"ap", "ap50"}``, from COCOeval's precision table; None for a class without test
    objects) and ``detections`` (their number). No detection at all scores 0.
    """
    from pycocotools.cocoeval import COCOeval

    rows = []
    for index, found in enumerate(detections):
        boxes = found["boxes"].double()
        wh = boxes[:, 2:] - boxes[:, :2]
        rows.append(
            torch.cat(
                [
                    torch.full((boxes.size(0), 1), float(index), dtype=torch.float64),
                    boxes[:, :2],
                    wh,
                    found["scores"].double()[:, None],
                    found["labels"].double()[:, None],
                ],
                dim=1,
            )
        )
    table = torch.cat(rows).numpy() if rows else np.zeros((0, 7))
    has_objects = {
        label: bool(ground_truth.getAnnIds(catIds=[label], iscrowd=False)) for label in range(1, len(classes) + 1)
    }
    if table.shape[0] == 0:
        per_class = {
            name: ({"ap": 0.0, "ap50": 0.0} if has_objects[label] else None) for label, name in enumerate(classes, 1)
        }
        return {"map": 0.0, "ap50": 0.0, "per_class": per_class, "detections": 0}
    with _quiet():
        results = ground_truth.loadRes(table)
        evaluation = COCOeval(ground_truth, results, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision [IoU thresholds, recall points, classes, area ranges, max detections]: all areas, 100 detections
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for position, label in enumerate(evaluation.params.catIds):
        table_k = precision[:, :, position]
        if not has_objects[label] or (table_k < 0).all():
            per_class[classes[label - 1]] = None
            continue
        per_class[classes[label - 1]] = {
            "ap": float(table_k[table_k > -1].mean()),
            "ap50": float(table_k[0][table_k[0] > -1].mean()),
        }
    stats = [max(0.0, float(value)) for value in evaluation.stats[:2]]  # -1: nothing to score
    return {"map": stats[0], "ap50": stats[1], "per_class": per_class, "detections": int(table.shape[0])}


@torch.no_grad()
def _detect(net: FastRCNN, proposals: WindowProposals, images: Sequence[Tensor], device: torch.device) -> list[dict]:
    """Detections (on the CPU) for uint8 or [0, 1] float ``images``, in their pixels."""
    inputs = [(image.float() / 255 if not image.is_floating_point() else image).to(device) for image in images]
    windows = [proposals(image.size(1), image.size(2)).to(device) for image in images]
    return [{key: value.cpu() for key, value in found.items()} for found in net(inputs, windows)]


def _samples(dataset: DetectionDataset, indices: Sequence[int], pool: ThreadPoolExecutor | None):
    if pool is None:
        return [dataset[i] for i in indices]
    return list(pool.map(dataset.__getitem__, indices))


def evaluate_detector(
    net: FastRCNN,
    proposals: WindowProposals,
    dataset: DetectionDataset,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    ground_truth=None,
    context: distributed.Context | None = None,
    workers: int = 0,
) -> dict:
    """COCO mAP of ``net`` on ``dataset`` (see :func:`coco_evaluate` for the result).

    Under torchrun (``context``) each rank detects on its contiguous share and rank 0 scores
    them all; every rank returns the same result. ``ground_truth``: a ready
    :func:`coco_ground_truth` of ``dataset`` (built here otherwise)."""
    context = context or distributed.Context()
    device = torch.device(device)
    net.eval()
    distributed.broadcast_buffers(net, context)
    start, stop = distributed.shard_range(len(dataset), context)
    found: list[dict] = []
    with ThreadPoolExecutor(workers) if workers > 0 else contextlib.nullcontext() as pool:
        for first in range(start, stop, batch_size):
            images = [image for image, _ in _samples(dataset, range(first, min(first + batch_size, stop)), pool)]
            found += _detect(net, proposals, images, device)
    if context.distributed:
        shares = [None] * context.world_size if context.is_main else None
        dist.gather_object(found, shares, dst=0)
        result = [None]
        if context.is_main:
            found = [detection for share in shares for detection in share]
            result[0] = coco_evaluate(ground_truth or coco_ground_truth(dataset), found, dataset.classes)
        dist.broadcast_object_list(result, src=0)
        return result[0]
    return coco_evaluate(ground_truth or coco_ground_truth(dataset), found, dataset.classes)


# ---- pictures ----------------------------------------------------------------------------------------

_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
    (170, 110, 40),
]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None,
    classes: Sequence[str],
    truth: Tensor | None = None,
    min_side: int = 256,
):
    """``image`` (``Tensor[3, H, W]`` uint8) as a Pillow image with ``boxes`` (``Tensor[D, 4]``
    xyxy) outlined in a colour per class and labelled "name score"; ``truth`` boxes, if given,
    thin white. Images smaller than ``min_side`` are enlarged (nearest neighbour) so that the
    labels stay readable; the boxes are scaled with them."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    scale = max(1, math.ceil(min_side / min(picture.size)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    font = _font(max(10, min(picture.size) // 28))
    line = max(1, min(picture.size) // 200)
    for box in [] if truth is None else (truth * scale).tolist():
        draw.rectangle(box, outline=(255, 255, 255), width=1)
    shown_scores = [None] * len(labels) if scores is None else scores.tolist()
    for box, label, score in zip((boxes * scale).tolist(), labels.tolist(), shown_scores):
        colour = _PALETTE[(label - 1) % len(_PALETTE)]
        draw.rectangle(box, outline=colour, width=line + 1)
        name = classes[label - 1] if 0 < label <= len(classes) else str(label)
        text = name if score is None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text, font=font)
        top_edge = max(0, box[1] - (bottom - top) - 2)
        draw.rectangle([box[0], top_edge, box[0] + right - left + 4, top_edge + bottom - top + 2], fill=colour)
        draw.text((box[0] + 2, top_edge - (top - box[1])), text, fill=(0, 0, 0), font=font)
    return picture


def _grid(pictures: list, columns: int = 4):
    from PIL import Image

    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    rows = math.ceil(len(pictures) / columns)
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for index, picture in enumerate(pictures):
        sheet.paste(picture, ((index % columns) * width, (index // columns) * height))
    return sheet


def plot_detection_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """The training losses (left) and the test mAP and AP50 (right) against the epoch."""
    epochs = [entry["epoch"] for entry in history]
    figure = plots._figure(10, 4)
    loss_axes, map_axes = figure.subplots(1, 2)
    for key, label in (("loss", "total"), ("loss_classifier", "classifier"), ("loss_box_reg", "box regression")):
        loss_axes.plot(epochs, [entry[key] for entry in history], "-o", label=label, markersize=3)
    for key, label in (("map", "mAP@[.5:.95]"), ("ap50", "AP50")):
        map_axes.plot(epochs, [entry[key] for entry in history], "-s", label=label, markersize=3)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    map_axes.set(xlabel="epoch", ylabel="COCO average precision", title="test AP", ylim=(0, 1))
    plots.save_epoch_figure(figure, (loss_axes, map_axes), path)


# ---- a trained detector ------------------------------------------------------------------------------


class Detector:
    """A trained detector with its proposals and class names (from :func:`load_detector`).

    ``detector(images) -> list[dict]``: for ``Tensor[3, H, W]`` images (uint8, or float in
    [0, 1]) of any sizes, ``boxes`` (``Tensor[D, 4]`` xyxy in the image's pixels), ``labels``
    (``Tensor[D]``, 1-based into :attr:`classes`) and ``scores``, by decreasing score, on the CPU.
    """

    def __init__(
        self, net: FastRCNN, proposals: WindowProposals, classes: Sequence[str], device: torch.device | str = "cpu"
    ):
        self.net, self.proposals, self.classes = net.eval(), proposals, list(classes)
        self.device = torch.device(device)

    def __call__(self, images: Sequence[Tensor]) -> list[dict]:
        for number, image in enumerate(images):
            if not isinstance(image, Tensor) or image.dim() != 3 or image.size(0) != 3:
                shape = list(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"Detector: images[{number}] must be a Tensor[3, H, W], got {shape}")
        return _detect(self.net, self.proposals, images, self.device)


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu") -> Detector:
    """The detector in ``path``: a ``best.pt``/``last.pt`` of :func:`fit_detector`, or the run's
    folder (its ``best.pt``). Raises ValueError naming the file when it is not one."""
    path = Path(os.path.expanduser(os.fspath(path)))
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint (fastdl train fast-rcnn --out DIR writes DIR/best.pt)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises several types for a damaged or foreign file
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path}: not a Fast R-CNN checkpoint of fastdl train fast-rcnn (format {found!r})")
    net, proposals = build_detector(saved["model_settings"])
    net.load_state_dict(saved["model"])
    return Detector(net.to(device), proposals, saved["classes"], device)


# ---- training ----------------------------------------------------------------------------------------


@dataclass
class DetectionResult:
    """What :func:`fit_detector` returns.

    Attributes:
        history: one dict per epoch (as in ``metrics.json``): ``epoch`` (from 1), ``loss``,
            ``loss_classifier``, ``loss_box_reg`` (means over the epoch's images), ``lr``,
            ``images_per_s``, ``seconds``, ``train_images``, ``map``, ``ap50``,
            ``eval_seconds``, ``step_losses``.
        best_epoch, best_map, best_ap50: the epoch whose weights are in ``best.pt``.
        per_class: class name -> ``{"ap", "ap50"}`` of the best epoch (None: no test object).
        detector: the best epoch's network, proposals and classes (on rank 0; the last
            epoch's elsewhere).
        out: the folder of the files.
    """

    history: list[dict]
    best_epoch: int
    best_map: float
    best_ap50: float
    per_class: dict[str, dict | None]
    detector: Detector
    out: Path


def warmup_cosine(warmup_steps: int, total_steps: int):
    """The learning-rate multiplier of step ``s`` (from 0): a linear rise over the warmup (at
    most half the run), then half a cosine to 0 at ``total_steps``."""
    warmup = min(warmup_steps, total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total_steps - warmup) / max(total_steps - warmup, 1)))

    return factor


class _GlobalBatches:
    """Index batches of one epoch: every rank draws the same order (``generator``) and keeps its
    share of each global batch. A last batch with fewer images than processes is dropped."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, context: distributed.Context):
        self.size, self.batch_size, self.generator, self.context = size, batch_size, generator, context

    def __len__(self) -> int:
        full, last = divmod(self.size, self.batch_size)
        return full + (1 if last >= self.context.world_size else 0)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for batch in range(len(self)):
            yield order[batch * self.batch_size : (batch + 1) * self.batch_size]


class _Run:
    """The state of one call of :func:`fit_detector`."""

    def __init__(
        self, config: DetectionTrainConfig, spec: DetectionDataSpec, device: torch.device, context: distributed.Context
    ):
        self.config, self.spec, self.device, self.context = config, spec, device, context
        self.out = Path(config.out)
        if config.batch_size < context.world_size:
            raise ConfigError(
                f"--batch-size {config.batch_size}: each of the {context.world_size} processes needs "
                "at least one image of every batch"
            )
        _require_pycocotools()
        saved = self._resumable() if config.resume else None
        self.log(
            f"fastdl train fast-rcnn: {config.backbone} ({config.stages} stages) on {device}"
            + (f", {context.world_size} processes" if context.distributed else "")
        )

        torch.manual_seed(config.seed)  # initial weights and the RoI sampling
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.generators = {
            "shuffle": torch.Generator().manual_seed(config.seed + 1),
            "augment": torch.Generator().manual_seed(config.seed + 2),
        }

        self.data = load_detection_data(spec, config.limit_train, config.limit_test, config.image_min_size(spec))
        self.log(_describe(self.data, spec))
        self.settings = model_settings(config, spec, len(self.data.classes) + 1)
        network, self.proposals = build_detector(self.settings, config.backbone_weights)
        self.net, self.model = wrap_model(network, device, context, sync_bn=False, channels_last=False, compile=False)
        parameters = [p for p in self.net.parameters() if p.requires_grad]
        lr = config.learning_rate
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
        self.batches = _GlobalBatches(len(self.data.train), config.batch_size, self.generators["shuffle"], context)
        if len(self.batches) == 0:
            raise ConfigError(f"--data {config.data}: {len(self.data.train)} training images make no batch")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.warmup_steps, config.epochs * len(self.batches))
        )
        self.pool = ThreadPoolExecutor(config.workers) if config.workers > 0 else None
        self.ground_truth = coco_ground_truth(self.data.test) if context.is_main else None

        self.history: list[dict] = []
        self.best = {"epoch": 0, "map": -1.0, "ap50": -1.0, "per_class": {}}
        self.start_epoch = 0
        if saved is not None:
            self._restore(saved)
        elif context.is_main and (self.out / "last.pt").is_file():
            self.log(f"note: {self.out / 'last.pt'} exists and is overwritten (pass --resume to continue it)")

    def log(self, text: str) -> None:
        if self.context.is_main:
            print(text, flush=True)

    # ---- resume ---------------------------------------------------------------------------------

    def _resumable(self) -> dict:
        saved = checkpoint.load_last(self.out, expected_format=FORMAT)
        path = str(self.out / "last.pt")
        checkpoint.check_same_recipe(
            saved["config"], self.config, path, fields=DETECTION_RECIPE_FIELDS, may_change=MAY_CHANGE
        )
        if saved["epoch"] >= self.config.epochs:
            raise ConfigError(
                f"--resume: {path} has already trained {saved['epoch']} epochs of --epochs "
                f"{self.config.epochs}; raise --epochs to train further"
            )
        return saved

    def _restore(self, saved: dict) -> None:
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # the lambda follows this run's --epochs (the same as before, or a longer schedule)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        checkpoint.restore_rng_state(saved["rng"], self.generators)
        self.history, self.best, self.start_epoch = list(saved["history"]), dict(saved["best"]), saved["epoch"]
        self.log(
            f"resumed {self.out / 'last.pt'} after epoch {self.start_epoch} (best mAP "
            f"{self.best['map']:.4f} at epoch {self.best['epoch']})"
        )

    # ---- one epoch ------------------------------------------------------------------------------

    def _augmentation(self, indices: list[int]) -> list[tuple[bool, Tensor]]:
        """Each image's flip and box jitter noise, drawn for the whole global batch in order (so
        the draws do not depend on the number of processes)."""
        generator, config = self.generators["augment"], self.config
        plan = []
        for index in indices:
            objects = int((~ignored_objects(self.data.train.targets[index])).sum())
            flip = config.flip and bool(torch.rand((), generator=generator) < 0.5)
            plan.append((flip, torch.randn(objects, config.jitter, 4, generator=generator)))
        return plan

    def _training_inputs(self, samples, plan):
        images, proposals, targets = [], [], []
        for (image, target), (flip, noise) in zip(samples, plan):
            height, width = image.shape[1:]
            keep = ~ignored_objects(target)
            boxes, labels = target["boxes"][keep], target["labels"][keep]
            if flip:
                image = image.flip(-1)
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            images.append(image.to(self.device).float() / 255)
            windows = self.proposals(height, width)
            proposals.append(torch.cat([windows, _jittered(boxes, noise, height, width)]).to(self.device))
            targets.append({"boxes": boxes.to(self.device), "labels": labels.to(self.device)})
        return images, proposals, targets

    def _shares(self) -> Iterator[tuple[list, list, int]]:
        """Per step: this rank's samples, their augmentation and the global batch size; the next
        share is decoded in the background while a step runs."""

        def share(indices):
            start, stop = distributed.shard_range(len(indices), self.context)
            plan = self._augmentation(indices)[start:stop]
            mine = indices[start:stop]
            pending = [self.pool.submit(self.data.train.__getitem__, i) for i in mine] if self.pool else mine
            return pending, plan, len(indices)

        def ready(pending):
            return [item.result() for item in pending] if self.pool else _samples(self.data.train, pending, None)

        waiting = None
        for indices in self.batches:
            current = share(indices)
            if waiting is not None:
                yield ready(waiting[0]), waiting[1], waiting[2]
            waiting = current
        if waiting is not None:
            yield ready(waiting[0]), waiting[1], waiting[2]

    def train_epoch(self, epoch: int) -> dict:
        config, context = self.config, self.context
        self.model.train()
        bar = progress_bar(
            len(self.batches), f"epoch {epoch + 1}/{config.epochs}", enabled=config.progress and context.is_main
        )
        totals = torch.zeros(3, dtype=torch.float64)  # classifier and box losses times images, images
        step_losses = []
        start = time.perf_counter()
        for samples, plan, global_size in self._shares():
            images, proposals, targets = self._training_inputs(samples, plan)
            losses = self.model(images, proposals, targets)
            # DDP averages the ranks' gradients: weighted so, the average is the global batch's mean
            loss = (losses["loss_classifier"] + losses["loss_box_reg"]) * (
                len(images) * context.world_size / global_size
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            sums = torch.tensor(
                [
                    losses["loss_classifier"].item() * len(images),
                    losses["loss_box_reg"].item() * len(images),
                    len(images),
                ],
                dtype=torch.float64,
            )
            sums = distributed.all_reduce_sum(sums.to(self.device), context).cpu()
            totals += sums
            step_losses.append((sums[0] + sums[1]).item() / sums[2].item())
            bar.update(int(sums[2]), (totals[0] + totals[1]).item() / totals[2].item(), None)
        bar.close()
        seconds = time.perf_counter() - start
        seen = totals[2].item()
        return {
            "loss": (totals[0] + totals[1]).item() / seen,
            "loss_classifier": totals[0].item() / seen,
            "loss_box_reg": totals[1].item() / seen,
            "images_per_s": seen / seconds if seconds > 0 else 0.0,
            "seconds": seconds,
            "train_images": int(seen),
            "step_losses": step_losses,
        }

    # ---- files ------------------------------------------------------------------------------------

    def _save(self, epoch_done: int, improved: bool) -> None:
        if not self.context.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        common = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "classes": self.data.classes,
            "model_settings": self.settings,
            "model": self.net.state_dict(),
            "epoch": epoch_done,
        }
        if improved:
            checkpoint.save({**common, "map": self.best["map"], "ap50": self.best["ap50"]}, self.out / "best.pt")
        checkpoint.save(
            {
                **common,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": checkpoint.rng_state(self.generators),
                "history": self.history,
                "best": self.best,
                "world_size": self.context.world_size,
            },
            self.out / "last.pt",
        )
        checkpoint.write_json(
            {
                "config": self.config.to_dict(),
                "model_settings": self.settings,
                "classes": self.data.classes,
                "world_size": self.context.world_size,
                "epochs": self.history,
                "best_epoch": self.best["epoch"],
                "best_map": self.best["map"],
                "best_ap50": self.best["ap50"],
                "per_class": self.best["per_class"],
            },
            self.out / "metrics.json",
        )
        if plots.have_matplotlib():
            plot_detection_curves(self.history, self.out / "curves.png")

    def _predictions(self, detector: Detector) -> None:
        """predictions.png: the first test images with the boxes the best weights find."""
        test = self.data.test
        count = min(PREDICTION_IMAGES, len(test))
        samples = _samples(test, range(count), self.pool)
        found = detector([image for image, _ in samples])
        pictures = []
        for (image, target), detection in zip(samples, found):
            shown = detection["scores"] >= self.config.score_threshold
            pictures.append(
                draw_detections(
                    image,
                    detection["boxes"][shown],
                    detection["labels"][shown],
                    detection["scores"][shown],
                    self.data.classes,
                    truth=target["boxes"],
                )
            )
        _grid(pictures).save(self.out / "predictions.png")

    # ---- the run ------------------------------------------------------------------------------------

    def run(self) -> DetectionResult:
        config = self.config
        width = len(str(config.epochs))
        try:
            for epoch in range(self.start_epoch, config.epochs):
                lr = self.optimizer.param_groups[0]["lr"]
                trained = self.train_epoch(epoch)
                started = time.perf_counter()
                tested = evaluate_detector(
                    self.net,
                    self.proposals,
                    self.data.test,
                    self.device,
                    config.batch_size,
                    self.ground_truth,
                    self.context,
                    config.workers,
                )
                entry = {
                    "epoch": epoch + 1,
                    **{k: v for k, v in trained.items() if k != "step_losses"},
                    "lr": lr,
                    "map": tested["map"],
                    "ap50": tested["ap50"],
                    "eval_seconds": time.perf_counter() - started,
                    "step_losses": trained["step_losses"],
                }
                self.history.append(entry)
                improved = tested["map"] > self.best["map"]
                if improved:
                    self.best = {
                        "epoch": epoch + 1,
                        "map": tested["map"],
                        "ap50": tested["ap50"],
                        "per_class": tested["per_class"],
                    }
                self._save(epoch + 1, improved)
                self.log(
                    f"epoch {epoch + 1:>{width}}/{config.epochs}  loss {entry['loss']:.4f} (classifier "
                    f"{entry['loss_classifier']:.4f}, box {entry['loss_box_reg']:.4f})  test mAP "
                    f"{entry['map']:.4f} AP50 {entry['ap50']:.4f}  lr {lr:.4g}  {entry['images_per_s']:,.1f} img/s  "
                    f"{format_duration(entry['seconds'])}" + ("  *best" if improved else "")
                )
            return self._finish()
        finally:
            if self.pool is not None:
                self.pool.shutdown()

    def _finish(self) -> DetectionResult:
        detector = Detector(self.net, self.proposals, self.data.classes, self.device)
        if self.context.is_main:
            best_path = self.out / "best.pt"
            if self.best["epoch"] != self.history[-1]["epoch"] and best_path.is_file():
                self.net.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
            self.log(
                f"best: epoch {self.best['epoch']}, test mAP@[.5:.95] {self.best['map']:.4f}, AP50 "
                f"{self.best['ap50']:.4f}; per class (AP, AP50):"
            )
            names = max(len(name) for name in self.data.classes)
            for name, scores in self.best["per_class"].items():
                shown = "   n/a" if scores is None else f"{scores['ap']:.4f}  {scores['ap50']:.4f}"
                self.log(f"  {name:<{names}}  {shown}")
            self._predictions(detector)
            pictures = "curves.png, predictions.png" if plots.have_matplotlib() else "predictions.png"
            self.log(f"files: {self.out}/last.pt, best.pt, metrics.json, {pictures}")
        return DetectionResult(
            self.history,
            self.best["epoch"],
            self.best["map"],
            self.best["ap50"],
            dict(self.best["per_class"]),
            detector,
            self.out,
        )


def fit_detector(config: DetectionTrainConfig | None = None, **overrides) -> DetectionResult:
    """Train a Fast R-CNN detector as ``config`` says (keyword arguments override its fields).

    Under torchrun (``WORLD_SIZE`` > 1) this process joins the process group and trains its
    share of each batch with DDP. Raises :class:`ConfigError` (a ValueError naming the
    argument) for settings that cannot work.
    """
    config = dataclasses.replace(config or DetectionTrainConfig(), **overrides)
    spec = config.check()
    return run_in_process_group(config.device, lambda device, context: _Run(config, spec, device, context).run())
