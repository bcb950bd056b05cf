"""fastdl.train.detection: ``fastdl train fast-rcnn`` end to end on generated shapes, exact resume,
``fastdl detect``, COCO scoring on cases whose answer is known, two-process DDP, the error
messages, and a convergence run (ResNet-18 Fast R-CNN to AP50 >= 0.8 on shapes)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fastdl.data.detection import DetectionDataset
from fastdl.data.shapes import Shapes
from fastdl.ops import box_iou
from fastdl.train import ConfigError
from fastdl.train import detect as detect_cli
from fastdl.train import detection_cli
from fastdl.train.detection import (
    DetectionResult,
    _jittered,
    coco_evaluate,
    coco_ground_truth,
    evaluate_detector,
    fit_detector,
    load_detector,
    load_detection_data,
    warmup_cosine,
)
from fastdl.train.detection_cli import DetectionTrainConfig, parse_detection_data

pytest.importorskip("pycocotools")
pytest.importorskip("PIL")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# Under an emulated CPU (.ci/emulated-cpus) a child process must run in the same emulator.
LAUNCHER = os.environ.get("FASTDL_TEST_LAUNCHER", "").split()

# A tiny run: 8 shapes images of 64 pixels in batches of 4 (2 steps an epoch), a narrow head.
TINY = dict(
    data="shapes",
    stages=2,
    min_size=64,
    batch_size=4,
    limit_train=8,
    limit_test=4,
    head_size=64,
    roi_size=3,
    proposals=32,
    window_sizes=(0.25, 0.45),
    window_stride=16,
    warmup_steps=1,
    workers=0,
    optimizer="adamw",
    lr=2e-3,
)
TINY_FLAGS = [
    "--data",
    "shapes",
    "--stages",
    "2",
    "--min-size",
    "64",
    "--batch-size",
    "4",
    "--limit-train",
    "8",
    "--limit-test",
    "4",
    "--head-size",
    "64",
    "--roi-size",
    "3",
    "--proposals",
    "32",
    "--window-sizes",
    "0.25,0.45",
    "--window-stride",
    "16",
    "--warmup-steps",
    "1",
    "--workers",
    "0",
    "--optimizer",
    "adamw",
    "--lr",
    "0.002",
    "--no-progress",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[DetectionResult, dict]:
    """Two epochs in one run: the reference of the resume test, and a model for detect."""
    out = tmp_path_factory.mktemp("straight")
    result = fit_detector(DetectionTrainConfig(**TINY, epochs=2, out=str(out), progress=False))
    return result, torch.load(out / "last.pt", weights_only=True)


def step_losses(history) -> list[float]:
    return [loss for entry in history for loss in entry["step_losses"]]


def train(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit:
        detection_cli.main(list(args))
    captured = capsys.readouterr()
    return exit.value.code, captured.out + captured.err


# ---------------------------------------------------------------------------------------------
# The command line, files, resume


def test_cli_trains_one_epoch_then_resumes_exactly(straight, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed = train(capsys, *TINY_FLAGS, "--out", str(out), "--epochs", "1")
    assert code == 0, printed
    assert "epoch 1/1  loss" in printed and "test mAP" in printed and "per class (AP, AP50)" in printed
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.json", "curves.png", "predictions.png"}

    torch.rand(5), random.random(), np.random.rand()  # draws between the runs must not matter
    code, printed = train(capsys, *TINY_FLAGS, "--out", str(out), "--epochs", "2", "--resume")
    assert code == 0, printed
    assert "resumed" in printed and "epoch 2/2" in printed and "epoch 1/2" not in printed

    reference, reference_last = straight
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert step_losses(metrics["epochs"]) == step_losses(reference.history)
    assert len(step_losses(metrics["epochs"])) == 4 and all(e["train_images"] == 8 for e in metrics["epochs"])
    last = torch.load(out / "last.pt", weights_only=True)
    assert last.keys() == reference_last.keys()
    for key, value in reference_last["model"].items():
        assert torch.equal(last["model"][key], value), key
    for entry in metrics["epochs"]:
        assert 0 <= entry["map"] <= entry["ap50"] <= 1
        for key in ("loss", "loss_classifier", "loss_box_reg", "images_per_s", "lr"):
            assert math.isfinite(entry[key]), key
        assert entry["loss"] == pytest.approx(entry["loss_classifier"] + entry["loss_box_reg"])
    assert metrics["classes"] == ["rectangle", "ellipse", "triangle"]
    assert metrics["model_settings"]["num_classes"] == 4 and metrics["model_settings"]["window_sizes"] == [16, 28.8]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"] and best["map"] == metrics["best_map"]
    assert set(metrics["per_class"]) == set(metrics["classes"])

    # best.pt's detector scores on the test split what the run recorded
    data = load_detection_data(parse_detection_data("shapes"), 8, 4, image_size=64)
    detector = load_detector(out)
    scored = evaluate_detector(detector.net, detector.proposals, data.test)
    assert scored["map"] == pytest.approx(metrics["best_map"]) and scored["ap50"] == pytest.approx(metrics["best_ap50"])

    from PIL import Image

    with Image.open(out / "predictions.png") as picture:
        assert picture.width == 4 * 256  # 4 test images enlarged to 256 pixels, one row
    with Image.open(out / "curves.png") as picture:
        assert picture.width >= 800


def test_schedule_warms_up_then_follows_a_cosine():
    factor = warmup_cosine(warmup_steps=4, total_steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)
    short = warmup_cosine(warmup_steps=100, total_steps=10)  # the warmup is at most half the run
    assert short(4) == 1.0 and short(0) == 0.2


def test_jittered_boxes_stay_near_their_box_and_inside_the_image():
    boxes = torch.tensor([[10.0, 10, 30, 40], [0, 50, 12, 64]])
    noise = torch.randn(2, 200, 4, generator=torch.Generator().manual_seed(0))
    copies = _jittered(boxes, noise, height=64, width=64)
    assert copies.size(0) == 400
    assert (copies[:, :2] >= 0).all() and (copies[:, 2:] <= 64).all()
    overlap = box_iou(copies[:200], boxes[:1])
    assert overlap.median() > 0.6 and overlap.min() > 0.2  # most are positives for the box head
    assert _jittered(boxes, noise[:, :0], 64, 64).shape == (0, 4)


def test_detect_prints_and_draws_what_the_detector_finds(straight, tmp_path, capsys):
    from PIL import Image

    result, _ = straight
    image = Shapes(1, 64, seed=7).images[0]
    path = tmp_path / "shape.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit:
        detect_cli.main(
            [
                "--model",
                str(result.out),
                str(path),
                str(tmp_path / "broken.jpg"),
                "--out",
                str(tmp_path / "drawn"),
                "--score-threshold",
                "0",
                "--device",
                "cpu",
            ]
        )
    captured = capsys.readouterr()
    assert exit.value.code == 1  # one image could not be read; the other was done
    assert f"{tmp_path / 'broken.jpg'}: cannot decode the image" in captured.err

    found = load_detector(result.out / "best.pt")([image])[0]
    lines = captured.out.splitlines()
    assert (
        lines[0]
        == f"{path}: {len(found['labels'])} objects (score >= 0.0), drawn in {tmp_path / 'drawn' / 'shape.png'}"
    )
    assert len(lines) == 1 + len(found["labels"]) > 1
    classes = ["rectangle", "ellipse", "triangle"]
    for line, box, label, score in zip(
        lines[1:], found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist()
    ):
        name, shown_score, corners = re.fullmatch(r"\s+(\w+)\s+([\d.]+)\s+\[(.*)\]", line).groups()
        assert name == classes[label - 1] and float(shown_score) == pytest.approx(score, abs=5e-4)
        assert [float(v) for v in corners.split(",")] == pytest.approx(box, abs=0.05)
    with Image.open(tmp_path / "drawn" / "shape.png") as drawn:
        assert drawn.size == (256, 256)  # enlarged 4x: the labels stay readable
        assert not np.array_equal(np.asarray(drawn)[::4, ::4], image.permute(1, 2, 0).numpy())  # boxes drawn

    with pytest.raises(SystemExit) as exit:
        detect_cli.main(["--model", str(tmp_path), str(path)])
    assert exit.value.code == 2
    assert f"--model {tmp_path}: {tmp_path / 'best.pt'}: no such checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# COCO scoring


class Boxes(DetectionDataset):
    """Ground truth without images: ``targets`` as given, 100 x 100 images."""

    def __init__(self, targets, classes=("a", "b")):
        self.targets, self.classes = targets, list(classes)
        self.image_sizes = [(100, 100)] * len(targets)


def detections(boxes, labels, scores=None):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.ones(len(labels)) if scores is None else torch.tensor(scores)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64), "scores": scores}


def test_coco_scores_known_cases():
    truth = [
        {"boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 80]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[0.0, 0, 20, 30]]), "labels": torch.tensor([1])},
    ]
    dataset = Boxes(truth)
    ground_truth = coco_ground_truth(dataset)
    perfect = [detections(t["boxes"], t["labels"].tolist()) for t in truth]
    scored = coco_evaluate(ground_truth, perfect, dataset.classes)
    assert scored["map"] == pytest.approx(1.0) and scored["ap50"] == pytest.approx(1.0) and scored["detections"] == 3
    assert scored["per_class"] == {
        "a": {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)},
        "b": {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)},
    }

    # every box widened to IoU 0.625 (40 -> 64 pixels wide): right at IoU 0.5, 0.55 and 0.6 only
    widened = [
        detections([[b[0], b[1], b[0] + (b[2] - b[0]) * 1.6, b[3]] for b in t["boxes"].tolist()], t["labels"].tolist())
        for t in truth
    ]
    assert all(box_iou(w["boxes"], t["boxes"]).diagonal().allclose(torch.tensor(0.625)) for w, t in zip(widened, truth))
    scored = coco_evaluate(ground_truth, widened, dataset.classes)
    assert scored["ap50"] == pytest.approx(1.0) and scored["map"] == pytest.approx(0.3)

    wrong_class = [detections(t["boxes"], [3 - label for label in t["labels"].tolist()]) for t in truth]
    assert coco_evaluate(ground_truth, wrong_class, dataset.classes)["map"] == 0.0
    nothing = [detections([], []) for _ in truth]
    assert coco_evaluate(ground_truth, nothing, dataset.classes) == {
        "map": 0.0,
        "ap50": 0.0,
        "per_class": {"a": {"ap": 0.0, "ap50": 0.0}, "b": {"ap": 0.0, "ap50": 0.0}},
        "detections": 0,
    }

    # a class without test objects has no AP; only class a is scored
    only_a = Boxes([truth[1]])
    scored = coco_evaluate(coco_ground_truth(only_a), [perfect[1]], only_a.classes)
    assert scored["per_class"]["b"] is None and scored["map"] == pytest.approx(1.0)


def test_difficult_objects_are_ignored_like_crowds():
    truth = [
        {
            "boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90]]),
            "labels": torch.tensor([1, 1]),
            "difficult": torch.tensor([False, True]),
        }
    ]
    dataset = Boxes(truth)
    ground_truth = coco_ground_truth(dataset)
    found_both = detections([[10, 10, 50, 50], [60, 60, 90, 90]], [1, 1], [0.5, 0.9])
    found_easy = detections([[10, 10, 50, 50]], [1])
    # finding the difficult one is no false positive, and missing it costs no recall
    assert coco_evaluate(ground_truth, [found_both], dataset.classes)["map"] == pytest.approx(1.0)
    assert coco_evaluate(ground_truth, [found_easy], dataset.classes)["map"] == pytest.approx(1.0)
    # a box elsewhere, scored higher, is a false positive
    stray = detections([[10, 10, 50, 50], [0, 60, 20, 90]], [1, 1], [0.5, 0.9])
    assert coco_evaluate(ground_truth, [stray], dataset.classes)["map"] < 0.6


# ---------------------------------------------------------------------------------------------
# Distributed


def test_two_processes_share_the_images_and_the_evaluation(tmp_path):
    """torchrun with 2 CPU processes (Gloo): each trains on its half of every batch and detects on
    half the test images; rank 0 gathers the detections. The mAP it records must be what one
    process scores with the saved weights on the whole test split."""
    out = tmp_path / "ddp"
    flags = [flag if flag != "8" else "10" for flag in TINY_FLAGS]  # 10 training images: a last batch of 2
    command = [
        *LAUNCHER,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastdl.train.detection_cli",
        *flags,
        "--limit-test",
        "6",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    # faulthandler: a rank that dies of a signal prints where it was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "exitcode  : -6" in done.stderr:
        # A rank aborted ("terminate called without an active exception") once in about 20 runs on
        # a 2-core machine, not yet explained and not reproduced alone: one retry, so that a crash
        # that repeats still fails the test; the first one is printed for the log.
        print("first run aborted:", done.stderr[-3000:])
        out = tmp_path / "ddp-retry"
        command[-1] = str(out)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1 and "2 processes" in done.stdout  # only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"][0]["train_images"] == 10
    assert len(metrics["epochs"][0]["step_losses"]) == 3

    data = load_detection_data(parse_detection_data("shapes"), 10, 6, image_size=64)
    detector = load_detector(out / "last.pt")
    scored = evaluate_detector(detector.net, detector.proposals, data.test, batch_size=4)
    assert scored["detections"] > 0
    assert scored["map"] == pytest.approx(metrics["epochs"][0]["map"], abs=1e-6)
    assert scored["ap50"] == pytest.approx(metrics["epochs"][0]["ap50"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--data", "pascal=/x"],
            r"--data pascal=/x: unknown data kind 'pascal'; expected voc=PATH, coco=IMAGES,JSON "
            r"or shapes",
        ),
        (["--data", "shapes=/tmp"], r"--data shapes=/tmp: shapes is generated and takes no path"),
        (["--data", "coco=/tmp"], r"--data coco=/tmp: coco needs IMAGES,JSON"),
        (["--data", "voc=/no/such/folder"], r"--data voc=/no/such/folder: the path '/no/such/folder' does not exist"),
        (["--data", "coco=/tmp,/tmp"], r"the path '/tmp' is not a file \(the annotation json\)"),
        (
            ["--data", "shapes", "--backbone", "vgg16"],
            r"--backbone: unknown backbone 'vgg16'; expected one of resnet18",
        ),
        (["--data", "shapes", "--stages", "5"], r"--stages: must be 2, 3 or 4, got 5"),
        (
            ["--data", "shapes", "--optimizer", "adam"],
            r"--optimizer: unknown optimizer 'adam'; expected one of sgd, adamw",
        ),
        (["--data", "shapes", "--min-size", "2000"], r"--min-size 2000 is larger than --max-size 1000"),
        (["--data", "shapes", "--proposals", "0"], r"--proposals: must be a positive integer, got 0"),
        (["--data", "shapes", "--window-sizes", "0.2,3"], r"--window-sizes: fractions of --min-size in \(0, 2\]"),
        (["--data", "shapes", "--backbone-weights", "/no/file.pt"], r"--backbone-weights: no file '/no/file.pt'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(capsys, args, message):
    code, printed = train(capsys, *args)
    assert code == 2 and re.search(message, printed), printed
    assert printed.startswith("python -m fastdl.train fast-rcnn: error: ")


def test_bad_data_and_resume_errors(capsys, tmp_path, straight):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, printed = train(capsys, "--data", f"voc={empty}")
    assert code == 2 and f"--data voc={empty}: {empty}: no Annotations/ folder and no .xml files" in printed
    code, printed = train(capsys, "--data", "shapes", "--resume", "--out", str(empty))
    assert code == 2 and f"--resume: no checkpoint '{empty / 'last.pt'}'" in printed

    reference, _ = straight
    code, printed = train(capsys, *TINY_FLAGS[:-2], "0.005", "--out", str(reference.out), "--resume", "--epochs", "3")
    assert code == 2 and "was trained with other settings (--lr 0.002 -> 0.005)" in printed
    code, printed = train(capsys, *TINY_FLAGS, "--out", str(reference.out), "--resume", "--epochs", "2")
    assert code == 2 and "has already trained 2 epochs of --epochs 2; raise --epochs to train further" in printed
    (empty / "last.pt").write_bytes(b"not a checkpoint")
    code, printed = train(capsys, "--data", "shapes", "--resume", "--out", str(empty))
    assert code == 2 and f"--resume: {empty / 'last.pt'} is not a readable checkpoint" in printed
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_detector(empty / "last.pt")
    torch.save({"format": "fastdl.train/1", "model": {}}, empty / "resnet.pt")
    with pytest.raises(
        ValueError,
        match=r"not a Fast R-CNN checkpoint of fastdl train fast-rcnn \(format "
        r"'fastdl.train/1'\)",
    ):
        load_detector(empty / "resnet.pt")
    with pytest.raises(ConfigError, match="--batch-size: must be a positive integer, got 0"):
        fit_detector(DetectionTrainConfig(**{**TINY, "batch_size": 0}))


def test_voc_data_splits_follow_the_folder(tmp_path):
    """A flat folder is split 4:1; train/ and test/ subfolders are the splits, the test split
    taking the training classes."""
    Shapes(10, 32, seed=0).save_voc(tmp_path / "one")
    data = load_detection_data(parse_detection_data(f"voc={tmp_path / 'one'}"))
    assert (len(data.train), len(data.test)) == (8, 2) and "every 5th image" in data.source
    Shapes(6, 32, seed=0).save_voc(tmp_path / "two" / "train")
    Shapes(3, 32, seed=1).save_voc(tmp_path / "two" / "test")
    data = load_detection_data(parse_detection_data(f"voc={tmp_path / 'two'}"), limit_train=4)
    assert (len(data.train), len(data.test)) == (4, 3) and data.source == "train/ and test/"
    assert data.test.classes == data.train.classes == ["ellipse", "rectangle", "triangle"]


# ---------------------------------------------------------------------------------------------
# Convergence


def test_resnet18_fast_rcnn_reaches_ap50_of_0_8_on_shapes(tmp_path):
    """On 64-pixel shapes, a ResNet-18 Fast R-CNN (two stages: stride 8) with sliding windows and
    jittered ground-truth proposals reaches AP50 >= 0.8 in 10 epochs of 400 images (one to two
    minutes on 2 cores). Seeded: this run reached 0.94 at its last epoch, 0.79 at its fifth."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        start = time.perf_counter()
        result = fit_detector(
            DetectionTrainConfig(
                data="shapes",
                stages=2,
                min_size=64,
                epochs=10,
                batch_size=8,
                limit_train=400,
                limit_test=100,
                optimizer="adamw",
                lr=2e-3,
                warmup_steps=30,
                head_size=256,
                roi_size=4,
                proposals=64,
                window_sizes=(0.2, 0.3, 0.45),
                window_stride=8,
                workers=0,
                out=str(tmp_path),
                progress=False,
            )
        )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    print(f"AP50 per epoch {[round(e['ap50'], 3) for e in result.history]} in {seconds:.0f} s")
    assert result.best_ap50 >= 0.8, result.history[-1]
