"""fastdl.data detection readers: Pascal VOC folders and COCO json files written here, read back
exactly; every documented problem skipped with a warning or refused with an error naming the
file; and the generated shapes (seeded, exact boxes, balanced classes, written as VOC)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastdl.data.coco import COCODetection
from fastdl.data.detection import DetectionDataWarning, DetectionSubset, clip_boxes, collate_detection
from fastdl.data.shapes import Shapes
from fastdl.data.voc import VOCDetection, parse_voc_xml

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def write_image(path, height, width, seed=0, format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    return pixels


def voc_xml(filename, objects, size=None):
    """A VOC annotation: objects are (name, xmin, ymin, xmax, ymax[, difficult])."""
    parts = []
    for name, *box in objects:
        difficult = box[4] if len(box) > 4 else 0
        parts.append(f"""<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
            <difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>
            <xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>""")
    size_xml = (
        "" if size is None else f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
    )
    return f"<annotation><folder>x</folder><filename>{filename}</filename>{size_xml}{''.join(parts)}</annotation>"


def write_voc(root, annotations, sizes, splits=None, layout="voc"):
    """``annotations``: stem -> objects; ``sizes``: stem -> (height, width) of its image.
    ``layout="flat"``: images beside their XML files (no JPEGImages/, Annotations/)."""
    images = root if layout == "flat" else root / "JPEGImages"
    xmls = root if layout == "flat" else root / "Annotations"
    pixels = {}
    for number, (stem, objects) in enumerate(annotations.items()):
        pixels[stem] = write_image(
            images / f"{stem}.jpg" if layout == "flat" else images / f"{stem}.png", *sizes[stem], seed=number
        )
        xmls.mkdir(parents=True, exist_ok=True)
        filename = f"{stem}.jpg" if layout == "flat" else f"{stem}.png"
        (xmls / f"{stem}.xml").write_text(voc_xml(filename, objects, sizes[stem]))
    for split, stems in (splits or {}).items():
        main = root / "ImageSets" / "Main"
        main.mkdir(parents=True, exist_ok=True)
        (main / f"{split}.txt").write_text("".join(f"{stem}\n" for stem in stems))
    return pixels


# ---------------------------------------------------------------------------------------------
# Pascal VOC


def test_voc_reads_boxes_labels_names_and_splits(tmp_path):
    annotations = {
        "a": [("dog", 1, 1, 10, 8), ("cat", 5, 3, 20, 16, 1)],
        "b": [("person", 3, 2, 12, 12)],
        "c": [("cat", 2, 2, 6, 6), ("dog", 10, 4, 18, 14)],
    }
    sizes = {"a": (16, 24), "b": (20, 14), "c": (15, 20)}
    pixels = write_voc(tmp_path / "VOCdevkit" / "VOC2012", annotations, sizes, {"train": ["a", "c"], "val": ["b"]})

    every = VOCDetection(tmp_path / "VOCdevkit")  # VOCdevkit holding one VOC folder is found
    assert every.classes == ["cat", "dog", "person"] and every.ids == ["a", "b", "c"]
    image, target = every[0]
    assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(pixels["a"]).permute(2, 0, 1))
    # VOC numbers pixels from 1, end inclusive: (1, 1, 10, 8) covers the pixels [0, 10) x [0, 8)
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[0, 0, 10, 8], [4, 2, 20, 16]]
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["difficult"].tolist() == [False, True] and target["image_id"] == "a"
    assert every.image_sizes == [(16, 24), (20, 14), (15, 20)]

    train = VOCDetection(tmp_path / "VOCdevkit" / "VOC2012", split="train")
    assert train.ids == ["a", "c"] and train.classes == ["cat", "dog"]  # the names of this split
    val = VOCDetection(tmp_path / "VOCdevkit" / "VOC2012", split="val", classes=train.classes + ["person"])
    assert val.targets[0]["labels"].tolist() == [3]
    # samples are copies: changing one leaves the data set as it was
    _, target = val[0]
    target["boxes"] += 1
    assert val.targets[0]["boxes"].tolist() == [[2, 1, 12, 12]]

    with pytest.raises(FileNotFoundError, match=r"test.txt: no such split file; the splits there: train, val"):
        VOCDetection(tmp_path / "VOCdevkit", split="test")
    with pytest.raises(ValueError, match=r"classes repeats \['cat'\]"):
        VOCDetection(tmp_path / "VOCdevkit", classes=["cat", "cat"])


def test_voc_flat_folder_of_images_beside_their_xml(tmp_path):
    """As the fruit images come: apple_1.jpg beside apple_1.xml, no ImageSets, XML sizes of 0."""
    root = tmp_path / "fruits"
    write_voc(
        root,
        {"apple_1": [("apple", 2, 3, 9, 9)], "banana_1": [("banana", 1, 1, 12, 5)]},
        {"apple_1": (10, 12), "banana_1": (8, 16)},
        layout="flat",
    )
    (root / "apple_1.xml").write_text(voc_xml("apple_1.jpg", [("apple", 2, 3, 9, 9)], size=(0, 0)))
    fruits = VOCDetection(root)
    assert fruits.classes == ["apple", "banana"]
    assert fruits.image_sizes == [(10, 12), (8, 16)]  # from the images, not the XML
    assert fruits.targets[1]["boxes"].tolist() == [[0, 0, 12, 5]]
    assert fruits[0][0].shape == (3, 10, 12)


def test_voc_problems_are_skipped_with_one_warning_each(tmp_path):
    root = tmp_path / "voc"
    annotations = {
        "good": [("cat", 1, 1, 8, 8)],
        "outside": [("cat", -5, 2, 30, 9), ("dog", 40, 40, 50, 50)],  # clipped; entirely outside: dropped
        "empty": [],
        "no_image": [("cat", 1, 1, 4, 4)],
        "bad_number": [("cat", 1, 1, 4, 4)],
        "stranger": [("cat", 2, 2, 6, 6), ("horse", 1, 1, 3, 3)],
        "corrupt": [("cat", 1, 1, 4, 4)],
    }
    sizes = {stem: (12, 16) for stem in annotations}
    write_voc(root, annotations, sizes)
    (root / "JPEGImages" / "no_image.png").unlink()
    (root / "Annotations" / "bad_number.xml").write_text(
        voc_xml("bad_number.png", [("cat", 1, 1, 4, 4)]).replace("<xmax>4</xmax>", "<xmax>four</xmax>")
    )
    (root / "Annotations" / "broken.xml").write_text("<annotation><object><name>cat</name>")
    (root / "JPEGImages" / "corrupt.png").write_bytes(b"not a png")

    with pytest.warns(DetectionDataWarning) as caught:
        voc = VOCDetection(root, classes=["cat", "dog"])
    messages = "\n".join(str(w.message) for w in caught)
    assert voc.ids == ["good", "outside", "stranger"]
    assert voc.targets[1]["boxes"].tolist() == [[0, 1, 16, 9]] and voc.targets[1]["labels"].tolist() == [1]
    assert voc.targets[2]["labels"].tolist() == [1]
    assert len(caught) == 6, messages  # one warning per kind of problem
    assert (
        f"unreadable annotations, skipped (2): {root / 'Annotations' / 'bad_number.xml'}: object 1 (cat): "
        "<xmax> is 'four', not a number" in messages
    )
    assert f"{root / 'Annotations' / 'broken.xml'}: malformed XML (no element found: line 1" in messages
    assert f"annotations without their image, skipped (1): {root / 'Annotations' / 'no_image.xml'}" in messages
    assert f"unreadable images, skipped (1): {root / 'JPEGImages' / 'corrupt.png'}: cannot read the image" in messages
    assert (
        "boxes with no area inside the image, skipped (1): " in messages
        and "(dog [39.0, 39.0, 50.0, 50.0])" in messages
    )
    assert "images without objects, skipped (1): " in messages and "empty.xml" in messages
    assert "objects of classes not in ['cat', 'dog'], skipped (1): " in messages and "stranger.xml (horse)" in messages

    with pytest.warns(DetectionDataWarning):
        kept = VOCDetection(root, classes=["cat", "dog"], keep_empty=True)
    assert kept.ids == ["empty", "good", "outside", "stranger"] and kept.targets[0]["boxes"].shape == (0, 4)

    with pytest.raises(ValueError, match=r"root element is <svg>"):
        (tmp_path / "svg.xml").write_text("<svg/>")
        parse_voc_xml(tmp_path / "svg.xml")
    with pytest.raises(FileNotFoundError, match="no Annotations/ folder and no .xml files"):
        VOCDetection(tmp_path / "voc" / "JPEGImages")
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.xml").write_text("not xml")
    with pytest.warns(DetectionDataWarning), pytest.raises(ValueError, match="no usable annotated image among 1"):
        VOCDetection(only_broken)


# ---------------------------------------------------------------------------------------------
# COCO


def write_coco(tmp_path, content, images):
    folder = tmp_path / "images"
    for name, (height, width) in images.items():
        write_image(folder / name, height, width, seed=len(name))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return folder, path


def coco_content():
    return {
        "images": [
            {"id": 7, "file_name": "seven.png", "height": 20, "width": 30},
            {"id": 3, "file_name": "three.png"},  # no size: read from the file
            {"id": 9, "file_name": "nine.png", "height": 10, "width": 10},
        ],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 18, "bbox": [2.5, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 44, "bbox": [10, 10, 40, 5]},  # reaches past the right edge
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 4]},  # no width: dropped
            {"id": 5, "image_id": 8, "category_id": 1, "bbox": [1, 1, 2, 2]},  # no such image
            {"id": 6, "image_id": 9, "category_id": 5, "bbox": [1, 1, 2, 2]},  # no such category
        ],
    }


def test_coco_maps_categories_converts_boxes_and_keeps_crowds(tmp_path):
    folder, path = write_coco(
        tmp_path, coco_content(), {"seven.png": (20, 30), "three.png": (16, 24), "nine.png": (10, 10)}
    )
    with pytest.warns(DetectionDataWarning) as caught:
        coco = COCODetection(folder, path)
    messages = "\n".join(str(w.message) for w in caught)
    assert coco.classes == ["person", "dog", "bottle"] and coco.category_ids == [1, 18, 44]  # in id order
    assert [target["image_id"] for target in coco.targets] == [7, 3]
    assert coco.image_sizes == [(20, 30), (16, 24)]
    seven, three = coco.targets
    assert seven["boxes"].tolist() == [[2.5, 3, 12.5, 8], [0, 0, 30, 20]]
    assert seven["labels"].tolist() == [2, 1] and seven["iscrowd"].tolist() == [False, True]
    assert three["boxes"].tolist() == [[10, 10, 24, 15]] and three["labels"].tolist() == [3]
    assert "annotations of image ids not in 'images', skipped (1): annotations[4] (image 8)" in messages
    assert "annotations of category ids not in 'categories', skipped (1): annotations[5] (category 5)" in messages
    assert "boxes with no area inside the image, skipped (1): three.png [1.0, 1.0, 1.0, 5.0]" in messages
    assert "images without annotations, skipped (1): nine.png" in messages
    image, target = coco[1]
    assert image.shape == (3, 16, 24) and torch.equal(target["boxes"], three["boxes"])

    # through a DataLoader, batches are lists
    loader = DataLoader(coco, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert [tuple(i.shape) for i in images] == [(3, 20, 30), (3, 16, 24)] and targets[1]["image_id"] == 3


def test_coco_errors_name_the_file_and_the_entry(tmp_path):
    folder, path = write_coco(tmp_path, coco_content(), {"seven.png": (20, 30), "three.png": (16, 24)})
    path.write_text('{"images": [}')
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(Expecting value: line 1 column 13"):
        COCODetection(folder, path)
    broken = coco_content()
    del broken["images"][1]["file_name"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=rf"{path}: image 3 needs 'file_name' \(str\), got None"):
        COCODetection(folder, path)
    broken = coco_content()
    broken["annotations"][2]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"annotations\[2\] needs 'bbox' as \[x, y, width, height\], got \[1, 2, 3\]"):
        COCODetection(folder, path)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="'categories' must be a list of objects, but it is missing"):
        COCODetection(folder, path)
    with pytest.raises(FileNotFoundError, match="no such annotation file"):
        COCODetection(folder, tmp_path / "missing.json")
    # a missing image is skipped, and with it the last usable one
    path.write_text(json.dumps(coco_content()))
    (folder / "seven.png").unlink()
    (folder / "three.png").unlink()
    with (
        pytest.warns(DetectionDataWarning) as caught,
        pytest.raises(ValueError, match="no usable annotated image among 3 images"),
    ):
        COCODetection(folder, path)
    assert any("images missing from the folder, skipped (3)" in str(w.message) for w in caught)


def test_clip_boxes_and_subsets():
    boxes = torch.tensor([[-3.0, 2, 5, 40], [10, 10, 12, 11], [20, 1, 30, 5], [float("nan"), 0, 1, 1]])
    clipped, valid = clip_boxes(boxes, height=16, width=12)
    assert clipped[:3].tolist() == [[0, 2, 5, 16], [10, 10, 12, 11], [12, 1, 12, 5]]
    assert valid.tolist() == [True, True, False, False]
    shapes = Shapes(6, 32, seed=4)
    subset = DetectionSubset(shapes, [4, 1])
    assert len(subset) == 2 and subset.classes == shapes.classes
    assert torch.equal(subset[0][0], shapes.images[4]) and subset.targets[1] is shapes.targets[1]


# ---------------------------------------------------------------------------------------------
# Shapes


def test_shapes_are_seeded_per_image():
    first = Shapes(12, 48, seed=3)
    assert torch.equal(first.images, Shapes(12, 48, seed=3).images)
    prefix = Shapes(5, 48, seed=3)  # image i depends on (seed, i) only
    assert torch.equal(prefix.images, first.images[:5])
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(prefix.targets, first.targets))
    other = Shapes(12, 48, seed=4)
    assert not torch.equal(other.images, first.images)
    assert first.images.dtype == torch.uint8 and first.images.shape == (12, 3, 48, 48)
    with pytest.raises(ValueError, match="max_objects must be an integer >= 3, got 2"):
        Shapes(3, 48, min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="min_scale 0.05 of image_size 48 is under 4 pixels"):
        Shapes(3, 48, min_scale=0.05)


def test_shapes_boxes_are_exact_and_classes_balanced():
    shapes = Shapes(60, 64, seed=0, masks=True)
    counts = torch.zeros(4, dtype=torch.int64)
    for image, target in (shapes[i] for i in range(len(shapes))):
        pixels = image.double() / 255
        boxes, masks = target["boxes"], target["masks"]
        assert 1 <= boxes.size(0) <= 6 and masks.shape == (boxes.size(0), 64, 64)
        assert masks.sum(0).max() <= 1  # objects never overlap
        counts += torch.bincount(target["labels"], minlength=4)
        for (x1, y1, x2, y2), mask in zip(boxes.long().tolist(), masks):
            rows, columns = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            assert [columns[0], rows[0], columns[-1] + 1, rows[-1] + 1] == [x1, y1, x2, y2]
            # from the pixels alone: the object's colour fills its box up to each edge, not beyond
            colour = pixels[:, mask].median(dim=1).values
            similar = (pixels - colour[:, None, None]).abs().amax(0) < 0.15
            inside = similar[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert inside[mask[y1:y2, x1:x2]].float().mean() > 0.95
            ring = torch.zeros_like(mask)
            ring[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1] = True
            ring[y1:y2, x1:x2] = False
            if ring.any():
                assert similar[ring].float().mean() < 0.1
    shares = counts[1:].double() / counts[1:].sum()
    assert counts[0] == 0 and ((shares > 0.25) & (shares < 0.42)).all(), counts.tolist()


def test_shapes_written_as_voc_read_back_the_same(tmp_path):
    shapes = Shapes(5, 40, seed=2)
    root = shapes.save_voc(tmp_path / "shapes", split="train")
    read = VOCDetection(root, split="train")
    assert read.classes == sorted(shapes.classes)  # names found in the files, sorted
    relabel = torch.tensor([0] + [read.classes.index(name) + 1 for name in shapes.classes])
    for index in range(len(shapes)):
        image, target = read[index]
        assert torch.equal(image, shapes.images[index])  # PNG: exact
        assert torch.equal(target["boxes"], shapes.targets[index]["boxes"])
        assert torch.equal(target["labels"], relabel[shapes.targets[index]["labels"]])
        assert not target["difficult"].any()
    same_labels = VOCDetection(root, classes=shapes.classes)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(same_labels.targets, shapes.targets))
    text = (root / "Annotations" / "000000.xml").read_text()
    assert "<filename>000000.png</filename>" in text and "<width>40</width>" in text
    assert textwrap.dedent(text).count("<object>") == shapes.targets[0]["boxes"].size(0)
