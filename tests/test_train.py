"""fastdl.train: the command line end to end, exact resume, seeds, early stopping, two-process
DDP against one process, and the error messages. Every run is tiny (resnet10 on a few images)."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdl import cli, models
from fastdl.data import CIFAR10
from fastdl.data import transforms as T
from fastdl.train import ConfigError, TrainConfig, fit, loop
from fastdl.train.distributed import Context, shard_range
from fastdl.train.progress import SilentBar, TextBar, format_duration, progress_bar

# Under an emulated CPU (.ci/emulated-cpus) a child process must run in the same emulator.
LAUNCHER = os.environ.get("FASTDL_TEST_LAUNCHER", "").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_cifar10(folder, train_per_batch=4, test=8, seed=0):
    """A CIFAR-10 folder in the official pickle layout: 5 x ``train_per_batch`` train images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n):
        return {
            b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }

    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{i}".encode() for i in range(10)]}))
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(train_per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    return folder


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("data") / "cifar-10-batches-py")


def cifar_config(cifar, out, **changes) -> TrainConfig:
    """20 CIFAR images in batches of 8 (steps of 8, 8, 4), with the CIFAR crop and flip."""
    settings = dict(
        model="resnet10",
        data=f"cifar10={cifar}",
        epochs=2,
        batch_size=8,
        lr=0.02,
        out=str(out),
        progress=False,
        workers=0,
    )
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def straight(cifar, tmp_path_factory):
    """Two epochs in one run: the reference of the resume and seed tests."""
    out = tmp_path_factory.mktemp("straight")
    result = fit(cifar_config(cifar, out))
    return result, torch.load(out / "last.pt", weights_only=True)


def step_losses(history) -> list[float]:
    return [loss for entry in history for loss in entry["step_losses"]]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# The command line, resume, seeds


def test_cli_trains_one_epoch_then_resumes_exactly(cifar, straight, tmp_path, capsys):
    out = tmp_path / "run"
    common = [
        "train",
        "resnet10",
        "--data",
        f"cifar10={cifar}",
        "--batch-size",
        "8",
        "--lr",
        "0.02",
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
    ]
    with pytest.raises(SystemExit) as first:
        cli.main([*common, "--epochs", "1"])
    assert first.value.code == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "per-class test accuracy" in printed
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.json", "curves.png", "predictions.png"}

    # something drawing from every generator between the runs must not matter
    torch.rand(5), random.random(), np.random.rand()
    with pytest.raises(SystemExit) as second:
        cli.main([*common, "--epochs", "2", "--resume"])
    assert second.value.code == 0
    printed = capsys.readouterr().out
    assert "resumed" in printed and "epoch 2/2" in printed and "epoch 1/2" not in printed

    # the split run equals two epochs in one run: the same losses, bit for bit the same weights
    reference, reference_last = straight
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert step_losses(metrics["epochs"]) == step_losses(reference.history)
    assert len(step_losses(metrics["epochs"])) == 6  # 20 images in batches of 8: 3 steps an epoch
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert_same_weights(last["model"], reference_last["model"])
    for state, expected in zip(last["optimizer"]["state"].values(), reference_last["optimizer"]["state"].values()):
        assert torch.equal(state["momentum_buffer"], expected["momentum_buffer"])
    lrs = [e["lr"] for e in metrics["epochs"]]
    assert lrs == pytest.approx([0.02, 0.01])  # cosine over the 2 epochs
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s"):
        assert all(np.isfinite(e[key]) for e in metrics["epochs"]), key

    # best.pt loads into a fresh model and reproduces the recorded test accuracy, per class too
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]
    model = models.load_checkpoint(
        models.ResNet(models.BasicBlock, [1, 1, 1, 1], num_classes=10, small_input=True), out / "best.pt"
    ).eval()
    test = CIFAR10(cifar, train=False)
    with torch.no_grad():
        right = model(T.normalize(test.images, best["mean"], best["std"])).argmax(1) == test.labels
    assert right.float().mean().item() == pytest.approx(metrics["best_test_acc"])
    for label, name in enumerate(test.classes):
        mine = test.labels == label
        recorded = metrics["per_class_accuracy"][name]
        if mine.any():
            assert recorded == pytest.approx(right[mine].float().mean().item()), name
        else:
            assert recorded is None, name


def test_seed_fixes_weights_shuffling_and_augmentation(cifar, straight, tmp_path):
    reference, _ = straight
    again = fit(cifar_config(cifar, tmp_path / "same", epochs=1))
    # the first epoch's steps do not depend on the schedule's length (the rate changes per epoch)
    assert again.history[0]["step_losses"] == reference.history[0]["step_losses"]
    other = fit(cifar_config(cifar, tmp_path / "other", epochs=1, seed=1))
    assert other.history[0]["step_losses"][0] != reference.history[0]["step_losses"][0]


def test_early_stopping_keeps_and_returns_the_best_epoch(tmp_path, monkeypatch):
    """Scripted test accuracies 0.5, 0.7, 0.6, 0.65: with patience 2 the run ends after epoch 4,
    and the best epoch (2) is in best.pt and in the returned model."""
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])
    evaluate = loop._Run.evaluate

    def scripted_evaluate(self):
        return {**evaluate(self), "test_acc": next(scripted)}

    monkeypatch.setattr(loop._Run, "evaluate", scripted_evaluate)
    config = TrainConfig(
        model="resnet10",
        data="digits",
        epochs=6,
        batch_size=16,
        limit_train=32,
        limit_test=16,
        patience=2,
        out=str(tmp_path),
        progress=False,
    )
    result = fit(config)
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4]
    assert result.stopped_early and result.best_epoch == 2 and result.best_test_acc == 0.7
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 2 and last["epoch"] == 4 and last["stopped_early"]
    assert_same_weights(result.model.state_dict(), best["model"])
    assert not torch.equal(best["model"]["fc.weight"], last["model"]["fc.weight"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["best_epoch"] == 2 and len(metrics["epochs"]) == 4
    with pytest.raises(ConfigError, match=r"--resume: .* stopped early at epoch 4 .* --patience 2"):
        fit(config, resume=True)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    assert isinstance(progress_bar(3, "epoch 1/1", stream=io.StringIO()), SilentBar)  # a pipe or file
    assert isinstance(progress_bar(3, "epoch 1/1", enabled=False, stream=Terminal()), SilentBar)  # --no-progress
    stream = Terminal()
    bar = TextBar(2, "epoch 1/1", stream)
    bar.update(8, 1.5, 0.25)
    bar.update(8, 1.0, 0.5)
    bar.close()
    drawn = stream.getvalue().split("\r")
    assert any(
        text.startswith("epoch 1/1 [########################] 2/2  loss 1.0000  acc  50.0%")
        and "img/s  ETA 0:00" in text
        for text in drawn
    ), drawn
    assert drawn[-1] == ""  # the line is cleared for the epoch summary
    assert (format_duration(75.2), format_duration(3725)) == ("1:15", "1:02:05")


# ---------------------------------------------------------------------------------------------
# Distributed


def test_shards_cover_each_global_batch_once():
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            ranges = [shard_range(n, Context(rank, world)) for rank in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_two_process_ddp_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (Gloo) and --sync-bn against one process on the same global
    batches: the same per-step losses and final weights, to float32 rounding. 124 images in
    global batches of 31 make 4 steps an epoch, each split 16 + 15 across the ranks.

    Without --sync-bn each rank would normalise by its own share's statistics, which differ.
    The learning rate is small because early training amplifies rounding differences (run once
    in float64, the two gave weights equal to about 1e-14)."""
    settings = dict(
        model="resnet10", data="digits", epochs=2, batch_size=31, limit_train=124, limit_test=40, lr=0.003, sync_bn=True
    )
    single = fit(TrainConfig(**settings, out=str(tmp_path / "single"), progress=False))
    out = tmp_path / "ddp"
    command = [
        *LAUNCHER,
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastdl.train",
        "resnet10",
        "--data",
        "digits",
        "--epochs",
        "2",
        "--batch-size",
        "31",
        "--limit-train",
        "124",
        "--limit-test",
        "40",
        "--lr",
        "0.003",
        "--sync-bn",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("epoch 1/2") == 1, done.stdout  # only rank 0 prints
    assert "2 processes" in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    ddp_losses, single_losses = step_losses(metrics["epochs"]), step_losses(single.history)
    assert len(ddp_losses) == len(single_losses) == 8
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-4)
    # (accuracies are left out: one borderline image flipping by rounding moves them by 1/40)
    for key in ("train_loss", "test_loss"):
        np.testing.assert_allclose(
            [e[key] for e in metrics["epochs"]], [e[key] for e in single.history], rtol=1e-4, err_msg=key
        )
    weights = torch.load(out / "last.pt", weights_only=True)["model"]
    expected = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(weights[key], value, rtol=1e-3, atol=2e-4, msg=key)
        else:
            assert torch.equal(weights[key], value), key


# ---------------------------------------------------------------------------------------------
# Errors


def run_cli(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", *args])
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["resnet19", "--data", "digits"], r"MODEL: unknown model 'resnet19'; expected one of resnet10, resnet18"),
        (
            ["resnet18", "--data", "imagenet=/x"],
            r"--data imagenet=/x: unknown data kind 'imagenet'; expected one of "
            r"cifar10=PATH, .* or digits",
        ),
        (["resnet18", "--data", "mnist"], r"--data mnist: mnist needs the folder of its files: --data mnist=PATH"),
        (["resnet18", "--data", "digits=/tmp"], r"--data digits=/tmp: digits is bundled and takes no path"),
        (
            ["resnet18", "--data", "cifar10=/no/such/folder"],
            r"--data cifar10=/no/such/folder: the path "
            r"'/no/such/folder' does not exist",
        ),
        (["resnet18", "--data", "digits", "--batch-size", "0"], r"--batch-size: must be a positive integer, got 0"),
        (["resnet18", "--data", "digits", "--device", "tpu"], r"--device: unknown device 'tpu'; expected one of auto"),
        (["resnet18", "--data", "digits", "--momentum", "1.5"], r"--momentum: must lie in \[0, 1\), got 1.5"),
        (["resnet18", "--data", "digits", "--limit-train", "-3"], r"--limit-train: must be a positive integer, got -3"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(capsys, args, message):
    err = run_cli(capsys, *args)
    assert err.startswith("fastdl train: error: ") and re.search(message, err), err


def test_bad_data_folders_and_resume_errors(capsys, tmp_path, cifar, straight):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = run_cli(capsys, "resnet10", "--data", f"cifar10={empty}")
    assert f"--data cifar10={empty}: no batches.meta in {empty}" in err
    err = run_cli(capsys, "resnet10", "--data", f"folder={empty}")
    assert f"--data folder={empty}: expected train/ and val/ (or test/) subfolders" in err
    err = run_cli(capsys, "resnet10", "--data", "digits", "--resume", "--out", str(empty))
    assert f"--resume: no checkpoint '{empty / 'last.pt'}'" in err

    reference, _ = straight
    done = ["resnet10", "--data", f"cifar10={cifar}", "--batch-size", "8", "--out", str(reference.out), "--resume"]
    err = run_cli(capsys, *done, "--lr", "0.05")
    assert "was trained with other settings (--lr 0.02 -> 0.05)" in err
    err = run_cli(capsys, *done, "--lr", "0.02", "--epochs", "2")
    assert "has already trained 2 epochs of --epochs 2; raise --epochs to train further" in err
    (empty / "last.pt").write_bytes(b"not a checkpoint")
    err = run_cli(capsys, "resnet10", "--data", "digits", "--resume", "--out", str(empty))
    assert f"--resume: {empty / 'last.pt'} is not a readable checkpoint" in err


# ---------------------------------------------------------------------------------------------
# Data kinds


def write_png(path, pixels):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_each_data_kind_reads_with_its_recipe(tmp_path, cifar):
    from fastdl.train.config import parse_data
    from fastdl.train.datasets import load_data

    cifar_data = load_data(parse_data(f"cifar10={cifar}"), limit_train=6)
    assert len(cifar_data.train) == 6 and cifar_data.in_channels == 3 and cifar_data.small_input
    assert cifar_data.mean == T.CIFAR10_MEAN and (cifar_data.crop_padding, cifar_data.flip) == (4, True)
    assert cifar_data.classes == [f"class{i}" for i in range(10)]

    digits = load_data(parse_data("digits"), limit_train=100, limit_test=10)
    assert (len(digits.train), len(digits.test), digits.in_channels) == (100, 10, 1)
    assert (digits.crop_padding, digits.flip, digits.small_input) == (0, False, True)
    pixels = digits.train.images.double() / 255  # the mean/std of the images actually trained on
    assert digits.mean[0] == pytest.approx(pixels.mean().item())
    assert digits.std[0] == pytest.approx(pixels.std().item(), rel=1e-2)

    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for name in ("cat", "dog"):
            for i in range(count):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                write_png(tmp_path / "pets" / split / name / f"{i}.png", pixels)
    folder = load_data(parse_data(f"folder={tmp_path / 'pets'}"), limit_train=4, workers=2)
    assert folder.classes == ["cat", "dog"] and folder.train.images.shape == (4, 3, 16, 16)
    assert folder.train.labels.tolist() == [0, 0, 1, 1]  # evenly spaced: both classes keep a share
    assert folder.test.labels.tolist() == [0, 1]
    assert (folder.crop_padding, folder.flip, folder.small_input) == (2, True, True)  # padding: 16 / 8
    write_png(tmp_path / "pets" / "val" / "bird" / "0.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match="hold different class folders"):
        load_data(parse_data(f"folder={tmp_path / 'pets'}"))
    write_png(tmp_path / "pets" / "train" / "bird" / "0.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"the images differ in size \(8x8, 16x16\)"):
        load_data(parse_data(f"folder={tmp_path / 'pets'}"))
