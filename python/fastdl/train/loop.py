"""``fit(config)``: train, evaluate every epoch, checkpoint, stop early, and report.

One epoch is: every rank takes its share of each global batch (:mod:`.distributed`), a step of
SGD on the mean loss of the global batch, then an evaluation of the whole test split (each rank
a contiguous share, the sums all-reduced). Rank 0 then writes ``last.pt``, ``best.pt`` (when
the test accuracy is the best so far), ``metrics.json`` and ``curves.png``; at the end it prints
the best epoch's per-class accuracy and draws ``predictions.png`` with the best weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ..data import TensorBatches
from . import checkpoint, distributed, plots
from .config import ConfigError, DataSpec, TrainConfig
from .datasets import TrainData, describe, load_data
from .model import build_model, wrap_model
from .progress import format_duration, progress_bar

__all__ = ["fit", "TrainResult", "resolve_device", "run_in_process_group", "should_stop"]

PREDICTION_IMAGES = 32  # test images drawn in predictions.png


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (as in ``metrics.json``): ``epoch`` (from 1), ``train_loss``,
            ``train_acc``, ``test_loss``, ``test_acc``, ``lr``, ``images_per_s``, ``seconds``,
            ``step_losses`` (the global batch's mean loss at each step).
        best_epoch, best_test_acc: the epoch whose weights are in ``best.pt``.
        per_class_accuracy: class name -> test accuracy of the best epoch (None: no test image).
        stopped_early: ``patience`` ended the run before ``epochs``.
        model: the network with the best epoch's weights (on rank 0; the last epoch's elsewhere).
        out: the folder of the files.
    """

    history: list[dict]
    best_epoch: int
    best_test_acc: float
    per_class_accuracy: dict[str, float | None]
    stopped_early: bool
    model: nn.Module
    out: Path
    classes: list[str] = field(default_factory=list)


def resolve_device(name: str, context: distributed.Context) -> torch.device:
    """``--device`` to a torch device: "auto" is CUDA, else MPS, else the CPU; under torchrun
    each process takes the CUDA device of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
        if context.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"--device cuda: LOCAL_RANK {context.local_rank} but only {torch.cuda.device_count()} CUDA devices"
            )
        return torch.device("cuda", context.local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: torch sees no MPS device (use --device cpu or auto)")
    return torch.device(name)


def run_in_process_group(device_name: str, run):
    """``run(device, context)`` on the device ``device_name`` resolves to, inside torchrun's process
    group when there is one (joined first, left however ``run`` ends); returns what it returns."""
    context = distributed.from_environment()
    device = resolve_device(device_name, context)
    context = distributed.start(device)
    try:
        return run(device, context)
    finally:
        distributed.stop(context)


def should_stop(history: list[dict], best_epoch: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs have passed since the best test accuracy (0: never)."""
    return patience > 0 and bool(history) and history[-1]["epoch"] - best_epoch >= patience


def cosine_factor(epochs: int):
    """The learning-rate multiplier of epoch ``e`` (from 0): half a cosine from 1 towards 0."""
    return lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)


class _Run:
    """The state of one call of :func:`fit`, built in the order the steps need it."""

    def __init__(self, config: TrainConfig, spec: DataSpec, device: torch.device, context: distributed.Context):
        self.config, self.spec, self.device, self.context = config, spec, device, context
        self.out = Path(config.out)
        if config.batch_size < 2 * context.world_size:
            raise ConfigError(
                f"--batch-size {config.batch_size}: each of the {context.world_size} processes needs at least 2 "
                "images of every global batch (BatchNorm)"
            )
        saved = self._resumable() if config.resume else None  # checked before the slow steps
        self.log(
            f"fastdl train: {config.model} on {device}"
            + (f", {context.world_size} processes" if context.distributed else "")
        )

        # the seed fixes the initial weights (torch's global generator) and the data's own streams
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.generators = {
            "shuffle": torch.Generator().manual_seed(config.seed + 1),
            "augment": torch.Generator().manual_seed(config.seed + 2),
        }

        self.data: TrainData = load_data(spec, config.limit_train, config.limit_test, config.workers)
        self.log(describe(self.data, spec))
        network = build_model(config.model, len(self.data.classes), self.data.in_channels, self.data.small_input)
        self.net, self.model = wrap_model(
            network, device, context, config.sync_bn, config.channels_last, config.compile
        )
        self.optimizer = torch.optim.SGD(
            self.net.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_factor(config.epochs))
        use_scaler = config.amp and device.type in ("cuda", "mps")
        self.scaler = torch.amp.GradScaler(device.type) if use_scaler else None

        train_batches = TensorBatches(
            self.data.train,
            config.batch_size,
            shuffle=True,
            generator=self.generators["shuffle"],
            transform=self.data.train_transform(self.generators["augment"]),
            device=device,
        )
        self.batches = distributed.ShardedBatches(train_batches, context, min_per_rank=2)
        if len(self.batches) == 0:
            raise ConfigError(
                f"--data {config.data}: {len(self.data.train)} training images give no batch of at "
                f"least 2 images per process (see --limit-train)"
            )

        self.history: list[dict] = []
        self.best = {"epoch": 0, "test_acc": -1.0, "per_class": {}}
        self.stopped_early = False
        self.start_epoch = 0
        if saved is not None:
            self._restore(saved)
        elif self.context.is_main and (self.out / "last.pt").is_file():
            self.log(f"note: {self.out / 'last.pt'} exists and is overwritten (pass --resume to continue it)")

    def log(self, text: str) -> None:
        if self.context.is_main:
            print(text, flush=True)

    # ---- resume ---------------------------------------------------------------------------------

    def _resumable(self) -> dict:
        """``out/last.pt``, checked before any work: same recipe, epochs left to train."""
        saved = checkpoint.load_last(self.out)
        path = str(self.out / "last.pt")
        checkpoint.check_same_recipe(saved["config"], self.config, path)
        done = saved["epoch"]
        if done >= self.config.epochs:
            raise ConfigError(
                f"--resume: {path} has already trained {done} epochs of --epochs {self.config.epochs}; "
                "raise --epochs to train further"
            )
        if saved["stopped_early"] and should_stop(saved["history"], saved["best"]["epoch"], self.config.patience):
            raise ConfigError(
                f"--resume: {path} stopped early at epoch {done} (no better test accuracy since epoch "
                f"{saved['best']['epoch']}, --patience {self.config.patience}); raise --patience, or pass 0, to go on"
            )
        return saved

    def _restore(self, saved: dict) -> None:
        """Continue where ``saved`` stopped: weights, optimiser, schedule, scaler, random states."""
        path, done = str(self.out / "last.pt"), saved["epoch"]
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        # the lambda follows this run's --epochs (the same as before, or a longer schedule)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        checkpoint.restore_rng_state(saved["rng"], self.generators)
        self.history, self.best, self.start_epoch = list(saved["history"]), dict(saved["best"]), done
        self.log(
            f"resumed {path} after epoch {done} (best test accuracy {100 * self.best['test_acc']:.2f}% "
            f"at epoch {self.best['epoch']})"
        )

    # ---- one epoch --------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> dict:
        config, device, context = self.config, self.device, self.context
        self.model.train()
        bar = progress_bar(
            len(self.batches), f"epoch {epoch + 1}/{config.epochs}", enabled=config.progress and context.is_main
        )
        loss_total = correct_total = seen = 0.0
        step_losses = []
        start = time.perf_counter()
        for images, labels, global_size in self.batches:
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, config.amp):
                logits = self.model(images)
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
            # DDP averages the ranks' gradients: scaled so, the average is the global batch's mean
            loss = loss_sum * (context.world_size / global_size)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            correct = (logits.detach().argmax(1) == labels).sum()
            sums = torch.stack(
                [
                    loss_sum.detach().double(),
                    correct.double(),
                    torch.tensor(labels.numel(), dtype=torch.float64, device=labels.device),
                ]
            )
            batch_loss, batch_correct, batch_seen = distributed.all_reduce_sum(sums, context).tolist()
            loss_total, correct_total, seen = loss_total + batch_loss, correct_total + batch_correct, seen + batch_seen
            step_losses.append(batch_loss / batch_seen)
            bar.update(int(batch_seen), loss_total / seen, correct_total / seen)
        bar.close()
        seconds = time.perf_counter() - start
        return {
            "train_loss": loss_total / max(seen, 1),
            "train_acc": correct_total / max(seen, 1),
            "images_per_s": seen / seconds if seconds > 0 else 0.0,
            "step_losses": step_losses,
            "train_seconds": seconds,
        }

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, accuracy and per-class accuracy on the test split, over all ranks."""
        net, device, context = self.net, self.device, self.context
        net.eval()
        distributed.broadcast_buffers(net, context)
        test = self.data.test
        num_classes = len(self.data.classes)
        start, stop = distributed.shard_range(len(test), context)
        share = TensorDataset(test.images[start:stop], test.labels[start:stop])
        batches = TensorBatches(share, self.config.batch_size, transform=self.data.eval_transform(), device=device)
        sums = torch.zeros(2 + 2 * num_classes, dtype=torch.float64, device=device)
        for images, labels in batches:
            if self.config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, self.config.amp):
                logits = net(images)
            right = logits.argmax(1) == labels
            sums[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            sums[1] += right.sum()
            sums[2 : 2 + num_classes] += torch.bincount(labels[right], minlength=num_classes).double()
            sums[2 + num_classes :] += torch.bincount(labels, minlength=num_classes).double()
        sums = distributed.all_reduce_sum(sums, context).cpu()
        per_class_correct, per_class_count = sums[2 : 2 + num_classes], sums[2 + num_classes :]
        per_class = {
            name: (per_class_correct[i] / per_class_count[i]).item() if per_class_count[i] > 0 else None
            for i, name in enumerate(self.data.classes)
        }
        return {
            "test_loss": (sums[0] / len(test)).item(),
            "test_acc": (sums[1] / len(test)).item(),
            "per_class": per_class,
        }

    # ---- files -------------------------------------------------------------------------------------

    def _save(self, epoch_done: int, improved: bool) -> None:
        if not self.context.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.net.state_dict()
        common = {
            "format": checkpoint.FORMAT,
            "config": self.config.to_dict(),
            "classes": self.data.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "in_channels": self.data.in_channels,
            "small_input": self.data.small_input,
        }
        if improved:
            checkpoint.save(
                {**common, "model": state, "epoch": epoch_done, "test_acc": self.best["test_acc"]}, self.out / "best.pt"
            )
        checkpoint.save(
            {
                **common,
                "model": state,
                "epoch": epoch_done,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": checkpoint.rng_state(self.generators),
                "history": self.history,
                "best": self.best,
                "stopped_early": self.stopped_early,
                "world_size": self.context.world_size,
            },
            self.out / "last.pt",
        )
        self._write_metrics()
        if plots.have_matplotlib():
            plots.plot_curves(self.history, self.out / "curves.png")

    def _write_metrics(self) -> None:
        checkpoint.write_json(
            {
                "config": self.config.to_dict(),
                "classes": self.data.classes,
                "world_size": self.context.world_size,
                "epochs": self.history,
                "best_epoch": self.best["epoch"],
                "best_test_acc": self.best["test_acc"],
                "per_class_accuracy": self.best["per_class"],
                "stopped_early": self.stopped_early,
            },
            self.out / "metrics.json",
        )

    def _predictions(self) -> None:
        """predictions.png from the best weights (now loaded into ``net``)."""
        test = self.data.test
        images = test.images[:PREDICTION_IMAGES]
        self.net.eval()
        with torch.no_grad():
            batch = self.data.eval_transform()(images.to(self.device))
            if self.config.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            predicted = self.net(batch).argmax(1).cpu().tolist()
        plots.plot_predictions(
            images, predicted, test.labels[:PREDICTION_IMAGES].tolist(), self.data.classes, self.out / "predictions.png"
        )

    # ---- the run ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        width = len(str(config.epochs))
        for epoch in range(self.start_epoch, config.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            trained = self.train_epoch(epoch)
            tested = self.evaluate()
            self.scheduler.step()
            entry = {
                "epoch": epoch + 1,
                "train_loss": trained["train_loss"],
                "train_acc": trained["train_acc"],
                "test_loss": tested["test_loss"],
                "test_acc": tested["test_acc"],
                "lr": lr,
                "images_per_s": trained["images_per_s"],
                "seconds": trained["train_seconds"],
                "step_losses": trained["step_losses"],
            }
            self.history.append(entry)
            improved = tested["test_acc"] > self.best["test_acc"]
            if improved:
                self.best = {"epoch": epoch + 1, "test_acc": tested["test_acc"], "per_class": tested["per_class"]}
            last_epoch = epoch + 1 == config.epochs
            self.stopped_early = not last_epoch and should_stop(self.history, self.best["epoch"], config.patience)
            self._save(epoch + 1, improved)
            self.log(
                f"epoch {epoch + 1:>{width}}/{config.epochs}  train loss {entry['train_loss']:.4f} "
                f"acc {100 * entry['train_acc']:5.1f}%  test loss {entry['test_loss']:.4f} "
                f"acc {100 * entry['test_acc']:5.1f}%  lr {lr:.4g}  {entry['images_per_s']:,.0f} img/s  "
                f"{format_duration(entry['seconds'])}" + ("  *best" if improved else "")
            )
            if self.stopped_early:
                self.log(
                    f"early stop: no better test accuracy for {config.patience} epochs "
                    f"(best {100 * self.best['test_acc']:.2f}% at epoch {self.best['epoch']})"
                )
                break
        return self._finish()

    def _finish(self) -> TrainResult:
        if self.context.is_main:
            best_path = self.out / "best.pt"
            if self.best["epoch"] != self.history[-1]["epoch"] and best_path.is_file():
                self.net.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
            self.log(
                f"best: epoch {self.best['epoch']}, test accuracy {100 * self.best['test_acc']:.2f}%; "
                "per-class test accuracy:"
            )
            names = max(len(name) for name in self.data.classes)
            for name, accuracy in self.best["per_class"].items():
                shown = "   n/a" if accuracy is None else f"{100 * accuracy:5.1f}%"
                self.log(f"  {name:<{names}}  {shown}")
            if plots.have_matplotlib():
                self._predictions()
            else:
                self.log("note: matplotlib is not installed, so curves.png and predictions.png are not drawn")
            self.log(
                f"files: {self.out}/last.pt, best.pt, metrics.json"
                + (", curves.png, predictions.png" if plots.have_matplotlib() else "")
            )
        return TrainResult(
            self.history,
            self.best["epoch"],
            self.best["test_acc"],
            dict(self.best["per_class"]),
            self.stopped_early,
            self.net,
            self.out,
            list(self.data.classes),
        )


def fit(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Train as ``config`` says (a :class:`TrainConfig`; keyword arguments override its fields).

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this process joins the process group
    and trains its share of each global batch with DDP. Raises :class:`ConfigError` (a
    ValueError naming the argument) for settings that cannot work.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    spec = config.check()
    return run_in_process_group(config.device, lambda device, context: _Run(config, spec, device, context).run())
