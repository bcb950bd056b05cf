"""COCO detection annotations: one JSON file of images, categories and boxes."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor

from .detection import DetectionDataset, Problems, clip_boxes, image_size, resolve_path
from .folder import read_image

__all__ = ["COCODetection"]


def _entries(content: dict, key: str, path: Path) -> list[dict]:
    entries = content.get(key)
    if not isinstance(entries, list):
        found = "missing" if entries is None else f"a {type(entries).__name__}"
        raise ValueError(f"{path}: {key!r} must be a list of objects, but it is {found}")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {key}[{number}] is a {type(entry).__name__}, expected an object")
    return entries


def _field(entry: dict, key: str, kind, path: Path, where: str):
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{path}: {where} needs {key!r} ({getattr(kind, '__name__', 'number')}), got {value!r}")
    return value


def _ids(entries: list[dict], key: str, path: Path) -> dict[int, dict]:
    by_id = {}
    for number, entry in enumerate(entries):
        entry_id = _field(entry, "id", int, path, f"{key}[{number}]")
        if entry_id in by_id:
            raise ValueError(f"{path}: {key}[{number}] repeats id {entry_id}")
        by_id[entry_id] = entry
    return by_id


class COCODetection(DetectionDataset):
    """Object boxes from a COCO ``instances_*.json`` file and its image folder.

    Args:
        images_dir: the folder that holds the images (``file_name`` is relative to it).
        annotation_json: the annotation file (``images``, ``annotations``, ``categories``).
        keep_empty: keep images without any annotation (by default skipped with a warning).

    Category ids (any integers) become the contiguous labels ``1..C`` in the order of the ids;
    ``classes`` holds their names and ``category_ids[label - 1]`` the original id. Boxes
    ``[x, y, width, height]`` become xyxy, clipped to the image. ``dataset[i]`` is ``(image,
    target)`` with ``boxes``, ``labels``, ``iscrowd`` (``Tensor[M]`` bool: crowd regions, which
    training leaves out and evaluation ignores) and ``image_id`` (the file's id).

    A file that is not valid JSON, or whose images, annotations or categories lack a field
    they need, raises ValueError naming the file and the entry. Annotations of unknown images or
    categories, boxes with no area inside the image, missing or unreadable image files and
    images left without annotations are skipped, one
    :class:`~fastdl.data.DetectionDataWarning` per kind.
    """

    def __init__(self, images_dir: str | os.PathLike, annotation_json: str | os.PathLike, keep_empty: bool = False):
        self.images_dir, path = resolve_path(images_dir), resolve_path(annotation_json)
        where = f"COCODetection({self.images_dir}, {path})"
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"{self.images_dir}: no such folder (the images of {path})")
        try:
            content = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such annotation file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(content, dict):
            raise ValueError(
                f"{path}: expected a JSON object with images, annotations and categories, "
                f"got a {type(content).__name__}"
            )
        images = _ids(_entries(content, "images", path), "images", path)
        categories = _ids(_entries(content, "categories", path), "categories", path)
        annotations = _entries(content, "annotations", path)
        self.category_ids = sorted(categories)
        self.classes = [str(_field(categories[i], "name", str, path, f"category {i}")) for i in self.category_ids]
        label_of = {category: label for label, category in enumerate(self.category_ids, 1)}

        problems = Problems(where)
        by_image: dict[int, list[tuple[list[float], int, bool]]] = defaultdict(list)
        for number, annotation in enumerate(annotations):
            entry = f"annotations[{number}]"
            image_id = _field(annotation, "image_id", int, path, entry)
            category = _field(annotation, "category_id", int, path, entry)
            bbox = annotation.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise ValueError(f"{path}: {entry} needs 'bbox' as [x, y, width, height], got {bbox!r}")
            if image_id not in images:
                problems.add("annotations of image ids not in 'images', skipped", f"{entry} (image {image_id})")
            elif category not in label_of:
                problems.add(
                    "annotations of category ids not in 'categories', skipped", f"{entry} (category {category})"
                )
            else:
                x, y, w, h = (float(v) for v in bbox)
                by_image[image_id].append(([x, y, x + w, y + h], label_of[category], bool(annotation.get("iscrowd"))))

        self.image_paths, self.image_sizes, self.targets = [], [], []
        for image_id, image in images.items():
            entry = f"image {image_id}"
            image_path = self.images_dir / _field(image, "file_name", str, path, entry)
            if not image_path.is_file():
                problems.add("images missing from the folder, skipped", image_path)
                continue
            width, height = image.get("width"), image.get("height")
            if not all(isinstance(v, int) and v > 0 for v in (width, height)):
                try:
                    height, width = image_size(image_path)
                except ValueError as error:
                    problems.add("unreadable images, skipped", error)
                    continue
            objects = by_image.get(image_id, [])
            boxes = torch.tensor([box for box, _, _ in objects], dtype=torch.float32).reshape(-1, 4)
            boxes, valid = clip_boxes(boxes, height, width)
            for number in (~valid).nonzero().flatten().tolist():
                problems.add(
                    "boxes with no area inside the image, skipped",
                    f"{image_path.name} {[round(v, 2) for v in objects[number][0]]}",
                )
            if not valid.any() and not keep_empty:
                problems.add("images without annotations, skipped", image_path.name)
                continue
            self.image_paths.append(image_path)
            self.image_sizes.append((height, width))
            self.targets.append(
                {
                    "boxes": boxes[valid],
                    "labels": torch.tensor([label for _, label, _ in objects], dtype=torch.int64)[valid],
                    "iscrowd": torch.tensor([crowd for *_, crowd in objects], dtype=torch.bool)[valid],
                    "image_id": image_id,
                }
            )
        problems.warn()
        if not self.targets:
            raise ValueError(f"{where}: no usable annotated image among {len(images)} images (see the warnings)")

    def load_image(self, index: int) -> Tensor:
        image = read_image(self.image_paths[index], "RGB")
        if tuple(image.shape[1:]) != self.image_sizes[index]:
            raise ValueError(
                f"{self.image_paths[index]}: decoded as {list(image.shape[1:])} (height, width), but "
                f"the annotation file says {list(self.image_sizes[index])}"
            )
        return image
