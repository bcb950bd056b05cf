"""``fastdl detect --model DIR IMAGE ...``: run a detector trained by ``fastdl train fast-rcnn``
on image files, print what it finds and write each image with its boxes drawn.

Building the parser imports no torch; :func:`run` loads the detector
(:func:`fastdl.train.detection.load_detector`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEVICES

__all__ = ["add_arguments", "run", "main", "build_parser", "DESCRIPTION", "EPILOG"]

DESCRIPTION = (
    "Detect objects in images with a detector trained by fastdl train fast-rcnn: print each box "
    "and write the images with the boxes drawn."
)
EPILOG = """examples:
  fastdl detect --model runs/fruits photos/*.jpg
  fastdl detect --model runs/shapes/best.pt shapes.png --out drawn --score-threshold 0.3"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="the --out folder of fastdl train fast-rcnn (its best.pt), or a checkpoint file",
    )
    parser.add_argument(
        "--out", default="detections", metavar="DIR", help="folder for the images with their boxes drawn (<name>.png)"
    )
    parser.add_argument("--score-threshold", type=float, default=0.5, help="least score of a box shown")
    parser.add_argument("--device", default="auto", metavar="|".join(DEVICES), help="auto: CUDA, else MPS, else CPU")


def _unused_name(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-1``, ``stem-2``, ...: images of one name from different folders
    each keep their picture."""
    name, number = stem, 1
    while name in used:
        name, number = f"{stem}-{number}", number + 1
    used.add(name)
    return name


def run(args: argparse.Namespace, prog: str = "fastdl detect") -> int:
    """Detect in ``args.images``; returns 0, 1 if an image could not be read (the others are
    still done), or 2 for a bad setting or model."""
    if not 0 <= args.score_threshold <= 1:
        print(f"{prog}: error: --score-threshold: must lie in [0, 1], got {args.score_threshold}", file=sys.stderr)
        return 2
    from ..data import read_image
    from .config import ConfigError
    from .detection import draw_detections, load_detector
    from .distributed import Context
    from .loop import resolve_device

    try:
        device = resolve_device(args.device, Context())
        detector = load_detector(args.model, device)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"{prog}: error: --model {args.model}: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(len(name) for name in detector.classes)
    status = 0
    used: set[str] = set()
    for name in args.images:
        try:
            image = read_image(name, "RGB")
        except (OSError, ValueError) as error:
            print(f"{prog}: error: {error}", file=sys.stderr)
            status = 1
            continue
        found = detector([image])[0]
        shown = found["scores"] >= args.score_threshold
        boxes, labels, scores = found["boxes"][shown], found["labels"][shown], found["scores"][shown]
        written = out / f"{_unused_name(Path(name).stem, used)}.png"
        draw_detections(image, boxes, labels, scores, detector.classes).save(written)
        print(
            f"{name}: {len(labels)} object{'' if len(labels) == 1 else 's'} (score >= {args.score_threshold}), "
            f"drawn in {written}"
        )
        for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            corners = ", ".join(f"{value:.1f}" for value in box)
            print(f"  {detector.classes[label - 1]:<{width}}  {score:.3f}  [{corners}]")
    return status


def build_parser(prog: str = "fastdl detect") -> argparse.ArgumentParser:
    from .cli import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    sys.exit(run(parser.parse_args(argv), prog=parser.prog))
