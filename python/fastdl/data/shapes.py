"""A synthetic detection data set: coloured rectangles, ellipses and triangles with exact boxes.

Nothing to download, any size, and hard enough that a detector has to find the objects by
their shape: colours are drawn independently of the class, sizes vary, and the backgrounds
are textured (smooth noise or a colour gradient, plus pixel noise).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .detection import DetectionDataset, resolve_path

__all__ = ["Shapes"]

# how far apart (in pixels) objects are kept, so that no object hides part of another and
# every box stays exactly the extent of its object's pixels
_GAP = 2
_PLACEMENT_TRIES = 30
_MIN_CONTRAST = 0.45  # Euclidean distance, on the 0..1 scale, between an object's colour and its background


class Shapes(DetectionDataset):
    """``num_images`` square images with 1-6 objects each, generated from ``seed``.

    Args:
        num_images: how many images.
        image_size: their side in pixels.
        seed: image ``i`` depends only on ``(seed, i)``: ``Shapes(100, seed=s)[i]`` equals
            ``Shapes(10, seed=s)[i]`` for ``i < 10``.
        min_objects, max_objects: the number of objects of an image is drawn uniformly between
            them; an object that finds no free place (after 30 tries) is left out, so crowded
            images may hold fewer.
        min_scale, max_scale: each side of an object is drawn uniformly between these fractions
            of ``image_size``.
        masks: also keep each object's pixels (``target["masks"]``, ``Tensor[M, H, W]`` bool).

    ``classes`` are ``["rectangle", "ellipse", "triangle"]`` (labels 1, 2, 3), each object's
    class uniform. ``images`` is ``Tensor[N, 3, S, S]`` uint8; ``dataset[i]`` is ``(images[i],
    target)`` with ``boxes`` (``Tensor[M, 4]`` float32: the smallest box around the object's
    pixels, so exact), ``labels`` and ``image_id = i``. Objects do not overlap or touch (2
    pixels apart at least) and differ clearly in colour from the background around them.
    """

    CLASSES = ("rectangle", "ellipse", "triangle")

    def __init__(
        self,
        num_images: int,
        image_size: int = 128,
        seed: int = 0,
        min_objects: int = 1,
        max_objects: int = 6,
        min_scale: float = 0.15,
        max_scale: float = 0.45,
        masks: bool = False,
    ):
        for name, value, least in (
            ("num_images", num_images, 0),
            ("image_size", image_size, 16),
            ("min_objects", min_objects, 1),
            ("max_objects", max_objects, min_objects),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Shapes: {name} must be an integer >= {least}, got {value!r}")
        if not 0 < min_scale <= max_scale <= 0.9:
            raise ValueError(f"Shapes: need 0 < min_scale <= max_scale <= 0.9, got {min_scale} and {max_scale}")
        if round(min_scale * image_size) < 4:
            raise ValueError(f"Shapes: min_scale {min_scale} of image_size {image_size} is under 4 pixels")
        self.image_size, self.seed = image_size, seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.min_scale, self.max_scale = min_scale, max_scale
        self.classes = list(self.CLASSES)
        self.images = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
        self.targets = []
        # pixel centres, shared by every mask
        self._ys, self._xs = torch.meshgrid(
            torch.arange(image_size) + 0.5, torch.arange(image_size) + 0.5, indexing="ij"
        )
        for index in range(num_images):
            self.images[index], target = self._generate(index)
            if not masks:
                del target["masks"]
            self.targets.append(target)
        self.image_sizes = [(image_size, image_size)] * num_images

    def load_image(self, index: int) -> Tensor:
        return self.images[index]

    # ---- generation -------------------------------------------------------------------------------

    def _generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes (seed, index) into independent streams (seed + index would not)
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def _background(self, g: torch.Generator) -> Tensor:
        size = self.image_size
        if torch.rand((), generator=g) < 0.5:
            # a linear gradient between two colours, at a random angle
            start, stop = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
            angle = 2 * math.pi * torch.rand((), generator=g).item()
            along = self._xs * math.cos(angle) + self._ys * math.sin(angle)
            along = (along - along.min()) / (along.max() - along.min())
            image = start + (stop - start) * along
        else:
            # smooth blotches: coarse noise, bilinearly enlarged, around one colour
            coarse = 0.2 * torch.randn(1, 3, 6, 6, generator=g)
            blotches = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
            image = torch.rand(3, 1, 1, generator=g) + blotches
        image = image + 0.04 * torch.randn(3, size, size, generator=g)
        return image.clamp(0, 1)

    def _place(self, g: torch.Generator, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
        """A free ``(x, y, w, h)`` for a new object, or None."""
        size = self.image_size
        low, high = round(self.min_scale * size), round(self.max_scale * size)
        for _ in range(_PLACEMENT_TRIES):
            w, h = torch.randint(low, high + 1, (2,), generator=g).tolist()
            x = torch.randint(0, size - w + 1, (), generator=g).item()
            y = torch.randint(0, size - h + 1, (), generator=g).item()
            if all(
                x + w + _GAP <= ox or ox + ow + _GAP <= x or y + h + _GAP <= oy or oy + oh + _GAP <= y
                for ox, oy, ow, oh in taken
            ):
                return x, y, w, h
        return None

    def _mask(self, label: int, x: int, y: int, w: int, h: int, g: torch.Generator) -> Tensor:
        """``Tensor[S, S]`` bool: the pixels (by their centres) of a shape in the box (x, y, w, h)."""
        xs, ys = self._xs, self._ys
        name = self.CLASSES[label - 1]
        if name == "rectangle":
            return (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
        if name == "ellipse":
            return ((xs - x - w / 2) / (w / 2)) ** 2 + ((ys - y - h / 2) / (h / 2)) ** 2 <= 1
        # a triangle with one side along an edge of the box and the opposite corner on the far edge
        apex = 0.2 + 0.6 * torch.rand((), generator=g).item()
        corners = torch.tensor([[apex, 0.0], [0.0, 1.0], [1.0, 1.0]])
        side = torch.randint(0, 4, (), generator=g).item()  # which edge the base lies on
        if side >= 2:
            corners = corners.flip(1)  # base on the right (or, flipped below, the left)
        if side % 2:
            corners = 1 - corners
        vertices = corners * torch.tensor([float(w), float(h)]) + torch.tensor([float(x), float(y)])
        inside = torch.ones_like(xs, dtype=torch.bool)
        positive = torch.ones_like(inside)
        (ax, ay), (bx, by), (cx, cy) = vertices.tolist()
        for (px, py), (qx, qy) in (((ax, ay), (bx, by)), ((bx, by), (cx, cy)), ((cx, cy), (ax, ay))):
            cross = (qx - px) * (ys - py) - (qy - py) * (xs - px)
            inside &= cross >= 0
            positive &= cross <= 0
        return inside | positive  # either winding

    def _colour(self, g: torch.Generator, around: Tensor) -> Tensor:
        """``Tensor[3]``: a colour at least ``_MIN_CONTRAST`` from the mean colour ``around``."""
        for _ in range(20):
            colour = torch.rand(3, generator=g)
            if torch.linalg.vector_norm(colour - around) >= _MIN_CONTRAST:
                return colour
        return (around < 0.5).float()  # the farthest corner of the colour cube

    def _generate(self, index: int) -> tuple[Tensor, dict]:
        g = self._generator(index)
        size = self.image_size
        image = self._background(g)
        wanted = torch.randint(self.min_objects, self.max_objects + 1, (), generator=g).item()
        taken, boxes, labels, masks = [], [], [], []
        for _ in range(wanted):
            label = torch.randint(1, len(self.CLASSES) + 1, (), generator=g).item()
            place = self._place(g, taken)
            if place is None:
                continue
            x, y, w, h = place
            mask = self._mask(label, x, y, w, h, g)
            rows, columns = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            if rows.numel() == 0:
                continue
            colour = self._colour(g, image[:, y : y + h, x : x + w].mean(dim=(1, 2)))
            painted = (colour[:, None, None] + 0.03 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
            image = torch.where(mask, painted, image)
            taken.append(place)
            boxes.append([columns[0].item(), rows[0].item(), columns[-1].item() + 1, rows[-1].item() + 1])
            labels.append(label)
            masks.append(mask)
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": index,
            "masks": torch.stack(masks) if masks else torch.zeros(0, size, size, dtype=torch.bool),
        }
        return (image * 255).round().to(torch.uint8), target

    # ---- writing ------------------------------------------------------------------------------------

    def save_voc(self, root: str | os.PathLike, split: str | None = None, image_format: str = "png") -> Path:
        """Write the set as a Pascal VOC folder: ``JPEGImages/<id>.<image_format>`` (PNG keeps
        the pixels exact; "jpg" for JPEG), ``Annotations/<id>.xml`` and, with ``split``,
        ``ImageSets/Main/<split>.txt``. Ids are ``000000``, ``000001``, ... Returns ``root``.

        :class:`~fastdl.data.VOCDetection` reads it back with the same boxes and labels."""
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("writing images needs Pillow: pip install pillow") from None
        if image_format not in ("png", "jpg"):
            raise ValueError(f"save_voc: image_format must be 'png' or 'jpg', got {image_format!r}")
        root = resolve_path(root)
        images_dir, annotations_dir = root / "JPEGImages", root / "Annotations"
        images_dir.mkdir(parents=True, exist_ok=True)
        annotations_dir.mkdir(parents=True, exist_ok=True)
        ids = [f"{index:06d}" for index in range(len(self))]
        for index, name in enumerate(ids):
            filename = f"{name}.{image_format}"
            Image.fromarray(self.images[index].permute(1, 2, 0).numpy()).save(images_dir / filename)
            self._annotation(filename, self.targets[index]).write(annotations_dir / f"{name}.xml", encoding="utf-8")
        if split is not None:
            main = root / "ImageSets" / "Main"
            main.mkdir(parents=True, exist_ok=True)
            (main / f"{split}.txt").write_text("".join(f"{name}\n" for name in ids))
        return root

    def _annotation(self, filename: str, target: dict) -> ElementTree.ElementTree:
        def add(parent: ElementTree.Element, tag: str, text=None) -> ElementTree.Element:
            child = ElementTree.SubElement(parent, tag)
            if text is not None:
                child.text = str(text)
            return child

        annotation = ElementTree.Element("annotation")
        add(annotation, "folder", "JPEGImages")
        add(annotation, "filename", filename)
        size = add(annotation, "size")
        for tag, value in (("width", self.image_size), ("height", self.image_size), ("depth", 3)):
            add(size, tag, value)
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            element = add(annotation, "object")
            add(element, "name", self.classes[label - 1])
            add(element, "difficult", 0)
            bndbox = add(element, "bndbox")
            # VOC's 1-based, end-inclusive pixel numbers (see fastdl.data.voc.parse_voc_xml)
            x1, y1, x2, y2 = (int(v) for v in box)
            for tag, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
                add(bndbox, tag, value)
        tree = ElementTree.ElementTree(annotation)
        ElementTree.indent(tree)
        return tree
