"""Pascal VOC detection annotations: one XML file per image."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .detection import DetectionDataset, Problems, check_classes, clip_boxes, image_size, resolve_path
from .folder import IMAGE_EXTENSIONS, read_image

__all__ = ["VOCDetection", "VOCObject", "parse_voc_xml"]


class VOCObject(NamedTuple):
    """One ``<object>``: its class name, ``[x1, y1, x2, y2]`` box and difficult flag."""

    name: str
    box: list[float]
    difficult: bool


def _text(element: ElementTree.Element, tag: str, path: Path, what: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{path}: {what} has no <{tag}>")
    return child.text.strip()


def parse_voc_xml(path: str | os.PathLike) -> tuple[str | None, list[VOCObject]]:
    """The ``<filename>`` (None if absent) and the objects of one VOC annotation file.

    Each object has ``name``, ``difficult`` and ``box``: ``[x1, y1, x2, y2]`` in 0-based
    continuous pixel coordinates. VOC numbers pixels from 1 and its boxes include both end
    pixels, so ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``.
    Raises ValueError naming the file for malformed XML or an object without a name or a
    numeric ``<bndbox>``.
    """
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: malformed XML ({error})") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: the root element is <{root.tag}>, expected VOC's <annotation>")
    filename = root.findtext("filename")
    objects = []
    for number, element in enumerate(root.iter("object"), 1):
        what = f"object {number}"
        name = _text(element, "name", path, what)
        box = element.find("bndbox")
        if box is None:
            raise ValueError(f"{path}: {what} ({name}) has no <bndbox>")
        coordinates = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _text(box, tag, path, f"{what} ({name})")
            try:
                coordinates.append(float(text))
            except ValueError:
                raise ValueError(f"{path}: {what} ({name}): <{tag}> is {text!r}, not a number") from None
        xmin, ymin, xmax, ymax = coordinates
        difficult = (element.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise ValueError(f"{path}: {what} ({name}): <difficult> is {difficult!r}, expected 0 or 1")
        objects.append(VOCObject(name, [xmin - 1, ymin - 1, xmax, ymax], difficult == "1"))
    return (filename.strip() if filename and filename.strip() else None), objects


def _find_layout(root: Path) -> tuple[Path, Path, Path]:
    """``(voc_root, annotations, images)`` folders of ``root``: the VOC layout
    (``Annotations/`` + ``JPEGImages/``), VOCdevkit holding one such folder, or a flat folder
    of images beside their XML files."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if (root / "Annotations").is_dir():
        images = root / "JPEGImages"
        if not images.is_dir():
            raise FileNotFoundError(f"{images}: missing (the images of {root / 'Annotations'})")
        return root, root / "Annotations", images
    nested = [child for child in sorted(root.iterdir()) if (child / "Annotations").is_dir()]
    if len(nested) == 1:  # VOCdevkit/VOC2012
        return _find_layout(nested[0])
    if nested:
        raise ValueError(f"{root}: holds several VOC folders ({', '.join(p.name for p in nested)}); pass one of them")
    if any(root.glob("*.xml")):
        return root, root, root
    raise FileNotFoundError(
        f"{root}: no Annotations/ folder and no .xml files; expected the Pascal VOC layout (JPEGImages/, "
        "Annotations/) or a folder of images beside their .xml annotations"
    )


class VOCDetection(DetectionDataset):
    """Object boxes in Pascal VOC's layout, read from files already on disk.

    Args:
        root: a VOC folder (``JPEGImages/``, ``Annotations/*.xml``, optionally
            ``ImageSets/Main/<split>.txt``), the ``VOCdevkit`` folder holding one, or a flat
            folder of images beside their XML files (as some smaller sets come, e.g. the fruit
            images with apple/banana/orange).
        split: the ids listed in ``ImageSets/Main/<split>.txt`` ("train", "val", "trainval",
            "test"); None: every ``.xml`` file, sorted by name.
        classes: the class names, in label order; default: the names found in the annotations,
            sorted. Objects of other classes are skipped with a warning.
        keep_empty: keep images without any object (by default skipped with a warning).

    ``dataset[i]`` is ``(image, target)``: ``Tensor[3, H, W]`` uint8 and ``boxes``
    (``Tensor[M, 4]`` float32 xyxy pixels, 0-based), ``labels`` (``Tensor[M]`` int64,
    ``1..len(classes)``), ``difficult`` (``Tensor[M]`` bool) and ``image_id`` (the file stem).

    The image of an annotation is its ``<filename>`` in the images folder, else the image with
    the XML file's stem. Problems skip what they affect and are reported as one
    :class:`~fastdl.data.DetectionDataWarning` per kind: malformed XML (with the parser's line
    and column), a missing or unreadable image, an object box outside the image (clipped to it;
    skipped if nothing is left), an unknown class, an image left without objects. A missing
    folder or split file raises FileNotFoundError, and ValueError if no image is left.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        classes: Sequence[str] | None = None,
        keep_empty: bool = False,
    ):
        self.root, annotations, images_dir = _find_layout(resolve_path(root))
        where = f"VOCDetection({self.root}" + (f", split={split!r})" if split else ")")
        wanted = check_classes(classes, where)
        problems = Problems(where)
        xml_files = self._xml_files(annotations, split, problems)
        images_by_stem = {
            path.stem: path for path in sorted(images_dir.iterdir()) if path.suffix.lower() in IMAGE_EXTENSIONS
        }

        parsed = []  # (xml path, image path, (height, width), objects)
        for xml_path in xml_files:
            try:
                filename, objects = parse_voc_xml(xml_path)
            except ValueError as error:
                problems.add("unreadable annotations, skipped", error)
                continue
            image_path = images_dir / filename if filename and (images_dir / filename).is_file() else None
            image_path = image_path or images_by_stem.get(xml_path.stem)
            if image_path is None:
                problems.add("annotations without their image, skipped", xml_path)
                continue
            try:
                size = image_size(image_path)
            except ValueError as error:
                problems.add("unreadable images, skipped", error)
                continue
            parsed.append((xml_path, image_path, size, objects))

        self.classes = wanted or sorted({obj.name for *_, objects in parsed for obj in objects})
        label_of = {name: label for label, name in enumerate(self.classes, 1)}
        self.ids, self.image_paths, self.image_sizes, self.targets = [], [], [], []
        for xml_path, image_path, (height, width), objects in parsed:
            known = [obj for obj in objects if obj.name in label_of]
            for obj in objects:
                if obj.name not in label_of:
                    problems.add(f"objects of classes not in {self.classes}, skipped", f"{xml_path} ({obj.name})")
            boxes = torch.tensor([obj.box for obj in known], dtype=torch.float32).reshape(-1, 4)
            boxes, valid = clip_boxes(boxes, height, width)
            for number in (~valid).nonzero().flatten().tolist():
                problems.add(
                    "boxes with no area inside the image, skipped",
                    f"{xml_path} ({known[number].name} {known[number].box})",
                )
            if not valid.any() and not keep_empty:
                problems.add("images without objects, skipped", xml_path)
                continue
            self.ids.append(xml_path.stem)
            self.image_paths.append(image_path)
            self.image_sizes.append((height, width))
            self.targets.append(
                {
                    "boxes": boxes[valid],
                    "labels": torch.tensor([label_of[obj.name] for obj in known], dtype=torch.int64)[valid],
                    "difficult": torch.tensor([obj.difficult for obj in known], dtype=torch.bool)[valid],
                    "image_id": xml_path.stem,
                }
            )
        problems.warn()
        if not self.targets:
            raise ValueError(
                f"{where}: no usable annotated image among {len(xml_files)} annotation files (see the warnings)"
            )

    @staticmethod
    def _xml_files(annotations: Path, split: str | None, problems: Problems) -> list[Path]:
        if split is None:
            return sorted(annotations.glob("*.xml"))
        if not isinstance(split, str) or not split or os.sep in split:
            raise ValueError(f"VOCDetection: split must be a split name such as 'train', got {split!r}")
        main = annotations.parent / "ImageSets" / "Main"
        listing = main / f"{split}.txt"
        if not listing.is_file():
            found = sorted(path.stem for path in main.glob("*.txt") if "_" not in path.stem) if main.is_dir() else []
            raise FileNotFoundError(
                f"{listing}: no such split file"
                + (f"; the splits there: {', '.join(found)}" if found else "; pass split=None for all files")
            )
        files = []
        for line in listing.read_text().splitlines():
            if not line.strip():
                continue
            xml_path = annotations / f"{line.split()[0]}.xml"
            if xml_path.is_file():
                files.append(xml_path)
            else:
                problems.add(f"ids listed in {listing.name} without an annotation file, skipped", xml_path)
        return files

    def load_image(self, index: int) -> Tensor:
        image = read_image(self.image_paths[index], "RGB")
        if tuple(image.shape[1:]) != self.image_sizes[index]:
            raise ValueError(
                f"{self.image_paths[index]}: decoded as {list(image.shape[1:])}, but its header said "
                f"{list(self.image_sizes[index])}"
            )
        return image
