"""``fastdl train fast-rcnn``: the settings of a detector's training run, their checks, and the
command line. Building the parser and checking the settings import no torch; the training
itself is :func:`fastdl.train.detection.fit_detector`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

from .cli import HelpFormatter, train_checked
from .config import DEVICES, ConfigError

__all__ = [
    "DetectionTrainConfig",
    "DetectionDataSpec",
    "parse_detection_data",
    "add_arguments",
    "config_from_args",
    "run",
    "main",
    "build_parser",
    "DESCRIPTION",
    "EPILOG",
    "BACKBONES",
    "OPTIMIZERS",
    "DETECTION_RECIPE_FIELDS",
]

BACKBONES = ("resnet18", "resnet50")
OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-3}
# the short side images are resized to when --min-size is not given (shapes: the generated size)
DEFAULT_MIN_SIZE = {"voc": 600, "coco": 600, "shapes": 96}

# The settings that decide a run's trajectory: a resumed run must keep them. --epochs, --device,
# --workers, --out, --no-progress and --score-threshold may change.
DETECTION_RECIPE_FIELDS = (
    "data",
    "backbone",
    "backbone_weights",
    "stages",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_steps",
    "min_size",
    "max_size",
    "proposals",
    "jitter",
    "window_sizes",
    "window_stride",
    "roi_size",
    "head_size",
    "flip",
    "seed",
    "limit_train",
    "limit_test",
)
MAY_CHANGE = "--epochs, --device, --workers, --no-progress and --score-threshold"


@dataclass(frozen=True)
class DetectionDataSpec:
    """``--data``: ``kind`` ("voc", "coco" or "shapes") and its paths.

    ``voc=PATH``: ``paths = (PATH,)``; ``coco=IMAGES,JSON``: ``(IMAGES, JSON)``, optionally
    followed by the test split's ``TEST_IMAGES,TEST_JSON``; ``shapes``: ``()``."""

    kind: str
    paths: tuple[str, ...]


def parse_detection_data(spec: str) -> DetectionDataSpec:
    """``"voc=~/VOC2012"``, ``"coco=images,instances.json"`` or ``"shapes"``, each path checked."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--data: expected voc=PATH, coco=IMAGES,JSON or shapes, got {spec!r}")
    kind, has_paths, rest = spec.partition("=")
    kind = kind.strip().lower()
    if kind == "shapes":
        if has_paths:
            raise ConfigError(
                f"--data {spec}: shapes is generated and takes no path (its sizes: --limit-train, "
                "--limit-test, --min-size)"
            )
        return DetectionDataSpec("shapes", ())
    if kind not in ("voc", "coco"):
        raise ConfigError(f"--data {spec}: unknown data kind {kind!r}; expected voc=PATH, coco=IMAGES,JSON or shapes")
    paths = tuple(os.path.expanduser(part.strip()) for part in rest.split(",")) if rest else ()
    if kind == "voc" and len(paths) != 1:
        raise ConfigError(f"--data {spec}: voc needs one folder: --data voc=PATH")
    if kind == "coco" and len(paths) not in (2, 4):
        raise ConfigError(
            f"--data {spec}: coco needs IMAGES,JSON (split 80/20 into train and test) or "
            "IMAGES,JSON,TEST_IMAGES,TEST_JSON"
        )
    for number, path in enumerate(paths):
        folder = kind == "voc" or number % 2 == 0
        if not os.path.exists(path):
            raise ConfigError(f"--data {spec}: the path {path!r} does not exist")
        if folder and not os.path.isdir(path):
            raise ConfigError(f"--data {spec}: the path {path!r} is not a folder")
        if not folder and not os.path.isfile(path):
            raise ConfigError(f"--data {spec}: the path {path!r} is not a file (the annotation json)")
    return DetectionDataSpec(kind, paths)


@dataclass
class DetectionTrainConfig:
    """One training run of a Fast R-CNN detector.

    Attributes:
        data: ``"voc=PATH"``, ``"coco=IMAGES,JSON"`` (or with ``,TEST_IMAGES,TEST_JSON``) or
            ``"shapes"`` (see :func:`parse_detection_data` and the data table in docs/models.md).
        backbone: "resnet18" or "resnet50".
        backbone_weights: a ResNet checkpoint (e.g. ImageNet weights) for the backbone.
        stages: ResNet stages kept in the backbone: 4 (stride 32), 3 (stride 16) or 2 (stride 8,
            for images of about 100 pixels).
        epochs: the length of the schedule.
        batch_size: images per step, shared by the processes under torchrun.
        optimizer: "sgd" (with ``momentum``) or "adamw".
        lr: the peak learning rate; None: 0.02 for SGD, 0.001 for AdamW.
        momentum, weight_decay: the optimiser's.
        warmup_steps: the learning rate rises linearly over these steps, then follows half a
            cosine to 0 at the last step.
        min_size, max_size: images are resized so that the short side is ``min_size`` unless the
            long side would pass ``max_size``; None: 600 for files, 96 for shapes (the size the
            images are generated at).
        proposals: RoIs sampled per training image for the loss (up to a quarter positive).
        jitter: jittered copies of each ground-truth box added to the training proposals.
        window_sizes: the sliding windows' sizes as fractions of ``min_size`` (3 aspect ratios
            each: 0.5, 1, 2).
        window_stride: the windows' step in pixels of the resized image; None: half the
            backbone's stride.
        roi_size: the RoIAlign output grid (``roi_size x roi_size``).
        head_size: the width of the box head's ``fc6`` and ``fc7``.
        flip: random horizontal flips in training.
        device: "auto", "cpu", "cuda" or "mps".
        workers: threads decoding image files.
        out: where ``last.pt``, ``best.pt``, ``metrics.json`` and the pictures go.
        resume: continue from ``out/last.pt``.
        seed: fixes the initial weights, the shuffling, the augmentation and the RoI sampling.
        limit_train, limit_test: use this many images of the split (evenly spaced; for shapes:
            the number generated, default 1000 and 200).
        progress: a progress bar per epoch when printing to a terminal.
        score_threshold: the least score of the boxes drawn in ``predictions.png``.
    """

    data: str = "shapes"
    backbone: str = "resnet18"
    backbone_weights: str | None = None
    stages: int = 4
    epochs: int = 12
    batch_size: int = 8
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_size: int | None = None
    max_size: int = 1000
    proposals: int = 128
    jitter: int = 8
    window_sizes: tuple[float, ...] = (0.125, 0.25, 0.5, 0.85)
    window_stride: int | None = None
    roi_size: int = 7
    head_size: int = 1024
    flip: bool = True
    device: str = "auto"
    workers: int = 4
    out: str = "train-results"
    resume: bool = False
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    progress: bool = True
    score_threshold: float = 0.5

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def image_min_size(self, spec: DetectionDataSpec) -> int:
        return DEFAULT_MIN_SIZE[spec.kind] if self.min_size is None else self.min_size

    def check(self) -> DetectionDataSpec:
        """Raise :class:`ConfigError` for the first impossible setting; return the parsed data."""
        spec = parse_detection_data(self.data)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"--backbone: unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.backbone_weights is not None and not os.path.isfile(os.path.expanduser(self.backbone_weights)):
            raise ConfigError(f"--backbone-weights: no file {self.backbone_weights!r}")
        if self.stages not in (2, 3, 4):
            raise ConfigError(f"--stages: must be 2, 3 or 4, got {self.stages!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"--optimizer: unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"--device: unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        for name, value in (
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--max-size", self.max_size),
            ("--proposals", self.proposals),
            ("--roi-size", self.roi_size),
            ("--head-size", self.head_size),
        ):
            _positive(name, value)
        for name, value in (
            ("--min-size", self.min_size),
            ("--window-stride", self.window_stride),
            ("--limit-train", self.limit_train),
            ("--limit-test", self.limit_test),
        ):
            if value is not None:
                _positive(name, value)
        for name, value in (
            ("--warmup-steps", self.warmup_steps),
            ("--jitter", self.jitter),
            ("--workers", self.workers),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {value!r}")
        if self.image_min_size(spec) > self.max_size:
            raise ConfigError(f"--min-size {self.image_min_size(spec)} is larger than --max-size {self.max_size}")
        if spec.kind == "shapes" and self.image_min_size(spec) < 32:
            raise ConfigError(f"--min-size: shapes images need at least 32 pixels, got {self.min_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum: must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay: must be >= 0, got {self.weight_decay}")
        if not self.window_sizes or not all(0 < size <= 2 for size in self.window_sizes):
            raise ConfigError(f"--window-sizes: fractions of --min-size in (0, 2], got {list(self.window_sizes)}")
        if not 0 <= self.score_threshold <= 1:
            raise ConfigError(f"--score-threshold: must lie in [0, 1], got {self.score_threshold}")
        if self.resume and not os.path.isfile(os.path.join(self.out, "last.pt")):
            raise ConfigError(
                f"--resume: no checkpoint {os.path.join(self.out, 'last.pt')!r} (--out {self.out}); "
                "train without --resume first, or pass the --out folder of the run to continue"
            )
        return spec

    def to_dict(self) -> dict:
        """The settings as plain values (stored in checkpoints and metrics.json)."""
        settings = dataclasses.asdict(self)
        settings["window_sizes"] = list(self.window_sizes)
        return settings


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value!r}")


DESCRIPTION = (
    "Train a Fast R-CNN detector (ResNet backbone, sliding-window proposals) on Pascal VOC or COCO "
    "annotations, or on generated shapes; evaluated by COCO mAP every epoch."
)
EPILOG = """examples:
  fastdl train fast-rcnn --data shapes --stages 2 --epochs 8 --out runs/shapes
  fastdl train fast-rcnn --data voc=~/data/fruits --backbone-weights resnet18.pt --epochs 20
  fastdl train fast-rcnn --data coco=~/coco/val2017,~/coco/annotations/instances_val2017.json
  torchrun --nproc_per_node=2 -m fastdl.train fast-rcnn --data voc=~/VOCdevkit/VOC2012 --batch-size 16"""


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastdl train fast-rcnn`` (the same for ``python -m fastdl.train fast-rcnn``)."""
    d = DetectionTrainConfig()
    parser.add_argument(
        "--data",
        required=True,
        metavar="KIND[=PATH]",
        help="voc=PATH (VOC folder, or a folder of images beside their .xml files), "
        "coco=IMAGES,JSON[,TEST_IMAGES,TEST_JSON], or shapes (generated)",
    )
    parser.add_argument("--backbone", default=d.backbone, metavar="|".join(BACKBONES), help="the ResNet")
    parser.add_argument(
        "--backbone-weights",
        default=None,
        metavar="FILE",
        help="ResNet weights for the backbone (a state_dict, e.g. ImageNet's saved from torchvision)",
    )
    parser.add_argument(
        "--stages",
        type=int,
        default=d.stages,
        help="ResNet stages kept: 4 (stride 32), 3 (stride 16) or 2 (stride 8, for small images)",
    )
    parser.add_argument("--epochs", type=int, default=d.epochs, help="length of the schedule")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="images per step, shared by the processes under torchrun"
    )
    parser.add_argument(
        "--optimizer", default=d.optimizer, metavar="|".join(OPTIMIZERS), help="SGD with momentum, or AdamW"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: 0.02 for sgd, 0.001 for adamw)"
    )
    parser.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    parser.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps before the cosine decay"
    )
    parser.add_argument(
        "--min-size",
        "--image-size",
        dest="min_size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="short side of the resized images (default: 600; shapes: 96, the generated size)",
    )
    parser.add_argument("--max-size", type=int, default=d.max_size, metavar="PIXELS", help="cap on the long side")
    parser.add_argument(
        "--proposals",
        type=int,
        default=d.proposals,
        metavar="N",
        help="RoIs sampled per training image for the loss (up to a quarter positive)",
    )
    parser.add_argument(
        "--jitter",
        type=int,
        default=d.jitter,
        metavar="N",
        help="jittered copies of each ground-truth box added to the training proposals",
    )
    parser.add_argument(
        "--window-sizes",
        type=_fractions,
        default=d.window_sizes,
        metavar="F,F,...",
        help="sliding-window sizes as fractions of --min-size (aspect ratios 0.5, 1, 2 each)",
    )
    parser.add_argument(
        "--window-stride",
        type=int,
        default=None,
        metavar="PIXELS",
        help="sliding-window step (default: half the backbone's stride)",
    )
    parser.add_argument("--roi-size", type=int, default=d.roi_size, help="RoIAlign output grid")
    parser.add_argument("--head-size", type=int, default=d.head_size, help="width of the fc6/fc7 box head")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--device", default=d.device, metavar="|".join(DEVICES), help="auto: CUDA, else MPS, else CPU")
    parser.add_argument("--workers", type=int, default=d.workers, help="threads decoding image files")
    parser.add_argument(
        "--out",
        default=d.out,
        metavar="DIR",
        help="folder for last.pt, best.pt, metrics.json, curves.png, predictions.png",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in DIR/last.pt")
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="fixes the initial weights, the shuffling, the augmentation and the RoI sampling",
    )
    parser.add_argument(
        "--limit-train",
        type=int,
        default=None,
        metavar="N",
        help="use N training images (shapes: generate N; default 1000)",
    )
    parser.add_argument(
        "--limit-test", type=int, default=None, metavar="N", help="use N test images (shapes: generate N; default 200)"
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=d.score_threshold,
        help="least score of the boxes drawn in predictions.png",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one line per epoch (also when not printing to a terminal)",
    )


def config_from_args(args: argparse.Namespace) -> DetectionTrainConfig:
    return DetectionTrainConfig(
        data=args.data,
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        stages=args.stages,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        min_size=args.min_size,
        max_size=args.max_size,
        proposals=args.proposals,
        jitter=args.jitter,
        window_sizes=tuple(args.window_sizes),
        window_stride=args.window_stride,
        roi_size=args.roi_size,
        head_size=args.head_size,
        flip=not args.no_flip,
        device=args.device,
        workers=args.workers,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        progress=not args.no_progress,
        score_threshold=args.score_threshold,
    )


def run(args: argparse.Namespace, prog: str = "fastdl train fast-rcnn") -> int:
    """Train from parsed arguments; a bad setting prints ``prog: error: ...`` and returns 2."""
    return train_checked(config_from_args(args), "detection", "fit_detector", prog)


def build_parser(prog: str = "python -m fastdl.train fast-rcnn") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    sys.exit(run(parser.parse_args(argv), prog=parser.prog))


if __name__ == "__main__":  # python -m fastdl.train.detection_cli (what torchrun can start, too)
    main()
