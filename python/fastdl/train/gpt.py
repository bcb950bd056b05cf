"""``fit_gpt(config)``: train a GPT-2 language model on a text corpus.

One optimiser step reads ``grad_accum`` micro-batches of ``batch_size`` windows of ``block_size
+ 1`` tokens (:class:`fastdl.data.text.TokenWindows`; under torchrun each process its share),
backpropagates the mean next-token loss over all of the step's targets, clips the gradient
norm, and takes an AdamW step at the rate of :func:`learning_rate`. Every ``eval_interval``
steps, and after the last, it measures the loss on fixed windows of the validation split, and
rank 0 writes ``last.pt``, ``best.pt`` (on a new best validation loss), ``metrics.json`` and
``curves.png``; every ``sample_interval`` steps rank 0 prints a sample of the model's text.

The settings and their checks are :class:`~fastdl.train.gpt_cli.GPTTrainConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import text
from . import checkpoint, distributed, plots
from .config import ConfigError
from .gpt_cli import DEFAULT_MAX_STEPS, RECIPE_FIELDS, TOKENIZERS, GPTTrainConfig
from .loop import run_in_process_group
from .progress import format_duration, progress_bar

__all__ = ["fit_gpt", "GPTTrainConfig", "GPTTrainResult", "learning_rate", "parameter_groups", "FORMAT"]

FORMAT = "fastdl.train.gpt/1"
SAMPLE_TEMPERATURE = 0.8  # samples: a little sharper than the model's distribution, as nanoGPT's
SAMPLE_TOP_K = 200
MAY_CHANGE = (
    "--max-steps, --epochs, --eval-interval, --eval-steps, --sample-interval, --sample-tokens, --device, "
    "--amp, --compile and --no-progress"
)


@dataclass
class GPTTrainResult:
    """What :func:`fit_gpt` returns.

    Attributes:
        evals: one dict per evaluation (as in ``metrics.json``): ``step``, ``val_loss``,
            ``train_loss`` (the mean step loss since the previous evaluation; None at step 0),
            ``lr``, ``tokens`` (trained so far), ``tokens_per_s``, ``seconds``.
        step_losses, step_lrs, step_grad_norms: one value per optimiser step: the mean loss of
            the step's tokens, its learning rate, the gradient norm before clipping.
        samples: ``{"step", "text"}`` of each printed sample.
        best_step, best_val_loss: the evaluation whose weights are in ``best.pt``.
        max_steps: the run's length in optimiser steps.
        model: the network after the last step.
        out: the folder of the files.
    """

    evals: list[dict]
    step_losses: list[float]
    step_lrs: list[float]
    step_grad_norms: list[float]
    samples: list[dict]
    best_step: int
    best_val_loss: float
    max_steps: int
    model: nn.Module
    out: Path


def learning_rate(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The rate of optimiser step ``step`` (from 0): ``lr * (step + 1) / warmup_steps`` during
    the warmup, then half a cosine from ``lr`` at step ``warmup_steps`` to ``min_lr`` at step
    ``max_steps`` (not taken), so the last step's rate is just above ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups, by nanoGPT's rule: every parameter of 2 or more dimensions decays
    (the linear layers' matrices, and the token and position embeddings), every 1-D one does
    not (biases, LayerNorm weights and biases). A tied weight is one parameter, counted once."""
    decay, no_decay = [], []
    for parameter in model.parameters():  # yields a shared parameter once
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


class _Run:
    """The state of one call of :func:`fit_gpt`, built in the order the steps need it."""

    def __init__(self, config: GPTTrainConfig, source: str, device: torch.device, context: distributed.Context):
        self.config, self.device, self.context = config, device, context
        self.out = Path(config.out)
        saved = self._resumable() if config.resume else None  # checked before the slow steps
        self.amp = config.amp and _bf16_supported(device)
        if config.amp and not self.amp:
            self.log(f"note: --amp: no bfloat16 autocast on {device}; training in float32")

        # the seed fixes the initial weights and dropout (torch's global generator), and the windows
        torch.manual_seed(config.seed)
        self.tokenizer = self._tokenizer()
        corpus = self._corpus(source)
        train_tokens, val_tokens = text.split_tokens(corpus.tokens, config.val_fraction)
        try:
            self.windows = text.TokenWindows(
                train_tokens,
                config.block_size,
                config.batch_size,
                torch.Generator().manual_seed(config.seed + 1),
                context.rank,
                context.world_size,
            )
            self.val_windows = text.evaluation_windows(
                val_tokens, config.block_size, config.eval_steps * config.batch_size
            )
        except ValueError as error:
            raise ConfigError(
                f"--data {config.data} with --block-size {config.block_size} and --batch-size "
                f"{config.batch_size}: {error}; lower them or use a longer text"
            ) from error
        self.max_steps = self._max_steps(saved)
        self.tokens_per_step = config.batch_size * config.grad_accum * config.block_size

        self.net = self._model(corpus.vocab_size).to(device)
        self.compiled = torch.compile(self.net) if config.compile else self.net
        self.ddp = None
        if context.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.compiled, device_ids=[device.index] if device.type == "cuda" else None
            )
        # fused: one pass over each parameter and its state where the default multi-tensor step
        # makes several; torch's fastest AdamW on the CPU as on CUDA
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.net, config.weight_decay),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            fused=device.type in ("cpu", "cuda"),
        )

        parameters = sum(p.numel() for p in self.net.parameters())
        self.log(
            f"fastdl train gpt: {parameters / 1e6:.2f}M parameters ({self._model_name()}) on {device}"
            + (f", {context.world_size} processes" if context.distributed else "")
        )
        self.log(
            f"data: {config.data}: {corpus.documents:,} documents, {corpus.characters:,} characters -> "
            f"{corpus.tokens.numel():,} tokens ({config.tokenizer}); train {train_tokens.numel():,}, validation "
            f"{val_tokens.numel():,} ({len(self.val_windows)} windows evaluated)"
            + (f"; skipped {len(corpus.skipped)} binary or non-UTF-8 files" if corpus.skipped else "")
        )
        self.log(
            f"{self.max_steps} steps of {self.tokens_per_step:,} tokens ({config.batch_size} x "
            f"{config.grad_accum} windows of {config.block_size}); an epoch is "
            f"{self.windows.batches_per_epoch / config.grad_accum:.4g} steps"
        )

        self.evals: list[dict] = []
        self.step_losses: list[float] = []
        self.step_lrs: list[float] = []
        self.step_grad_norms: list[float] = []
        self.samples: list[dict] = []
        self.best = {"step": 0, "val_loss": math.inf}
        self.step = 0  # optimiser steps done
        if saved is not None:
            self._restore(saved)
        elif context.is_main and (self.out / "last.pt").is_file():
            self.log(f"note: {self.out / 'last.pt'} exists and is overwritten (pass --resume to continue it)")

    def log(self, line: str) -> None:
        if self.context.is_main:
            print(line, flush=True)

    # ---- what the run trains on ---------------------------------------------------------------

    def _tokenizer(self):
        from ..data.tokenizer import get_tokenizer

        name = self.config.tokenizer
        try:
            return get_tokenizer(name if name in TOKENIZERS else os.path.expanduser(name))
        except (ImportError, OSError, RuntimeError, ValueError) as error:
            raise ConfigError(f"--tokenizer {self.config.tokenizer}: {error}") from error

    def _corpus(self, source: str) -> text.TextCorpus:
        try:
            return text.load_corpus(source, self.tokenizer)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--data {self.config.data}: {error}") from error

    def _max_steps(self, saved: dict | None) -> int:
        config = self.config
        if config.epochs is not None:
            return max(1, config.epochs * self.windows.batches_per_epoch // config.grad_accum)
        if config.max_steps is not None:
            return config.max_steps
        return saved["max_steps"] if saved is not None else DEFAULT_MAX_STEPS

    def _model_name(self) -> str:
        return f"--init {self.config.init}" if self.config.init else f"--config {self.config.config}"

    def _model(self, vocab_size: int) -> nn.Module:
        """A fresh model of the preset, its vocabulary the tokenizer's and its context
        (``n_ctx``) the block size; or the ``--init`` checkpoint's model."""
        from ..models.gpt2 import GPT, GPTConfig

        config = self.config
        overrides = {} if config.dropout is None else {"dropout": config.dropout}
        if config.init is None:
            try:
                model_config = GPTConfig.from_name(
                    config.config, vocab_size=vocab_size, n_ctx=config.block_size, **overrides
                )
            except ValueError as error:
                raise ConfigError(f"--config {config.config}: {error}") from error
            preset_vocab = GPTConfig.from_name(config.config).vocab_size
            if preset_vocab != vocab_size:
                self.log(
                    f"note: --config {config.config} has vocab_size {preset_vocab}; the model takes --tokenizer "
                    f"{config.tokenizer}'s {vocab_size}"
                )
            return GPT(model_config)
        try:
            model = GPT.from_pretrained(os.path.expanduser(config.init), **overrides)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--init {config.init}: {error}") from error
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"--init {config.init}: the model's vocab_size {model.config.vocab_size} is smaller than "
                f"--tokenizer {config.tokenizer}'s {vocab_size}"
            )
        if model.config.block_size < config.block_size:
            raise ConfigError(
                f"--block-size {config.block_size}: --init {config.init} holds positions for "
                f"{model.config.block_size} tokens"
            )
        return model

    # ---- resume ---------------------------------------------------------------------------------

    def _resumable(self) -> dict:
        saved = checkpoint.load_last(self.out, FORMAT)
        path = str(self.out / "last.pt")
        checkpoint.check_same_recipe(saved["config"], self.config, path, RECIPE_FIELDS, MAY_CHANGE)
        return saved

    def _restore(self, saved: dict) -> None:
        """Continue where ``saved`` stopped: weights, optimiser, windows and random states."""
        path = self.out / "last.pt"
        if saved["step"] >= self.max_steps:
            raise ConfigError(
                f"--resume: {path} has already trained {saved['step']} of {self.max_steps} steps; "
                "raise --max-steps (or --epochs) to train further"
            )
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.windows.load_state_dict(saved["windows"])
        checkpoint.restore_rng_state(saved["rng"], {})
        self.step, self.best = saved["step"], dict(saved["best"])
        self.evals, self.samples = list(saved["evals"]), list(saved["samples"])
        self.step_losses, self.step_lrs = list(saved["step_losses"]), list(saved["step_lrs"])
        self.step_grad_norms = list(saved["step_grad_norms"])
        self.log(
            f"resumed {path} after step {self.step} (best validation loss {self.best['val_loss']:.4f} at step "
            f"{self.best['step']})"
        )

    # ---- one step, an evaluation, a sample -------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        """One optimiser step; returns the mean loss of its tokens (all ranks) and the gradient
        norm before clipping. The gradients stay in the parameters until the next step."""
        config, context = self.config, self.context
        model = self.ddp or self.compiled
        lr = learning_rate(self.step, config.lr, config.min_lr, config.warmup_steps, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        windows_in_step = config.batch_size * config.grad_accum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(config.grad_accum):
            windows = self.windows.next_batch(self.device)
            # DDP's all-reduce once per step, with the last micro-batch's backward
            last = micro == config.grad_accum - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with self._autocast():
                    _, loss = model(windows[:, :-1], windows[:, 1:])
                # loss is this share's mean: weighted by its windows, DDP's mean over the ranks
                # and the sum over the micro-batches give the mean over the step's windows
                (loss * (windows.size(0) * context.world_size / windows_in_step)).backward()
            loss_sum += loss.detach().double() * windows.size(0)
        step_loss = (distributed.all_reduce_sum(loss_sum, context) / windows_in_step).item()
        if config.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.net.parameters(), config.grad_clip)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.net.parameters() if p.grad is not None])
        self.optimizer.step()
        self.step += 1
        self.step_losses.append(step_loss)
        self.step_lrs.append(lr)
        self.step_grad_norms.append(grad_norm.item())
        return step_loss, grad_norm.item()

    @torch.no_grad()
    def evaluate(self) -> float:
        """The mean loss over the validation windows (each rank a share, the sums all-reduced)."""
        self.compiled.eval()
        share = self.val_windows.tensor_split(self.context.world_size)[self.context.rank]
        per_batch = -(-self.config.batch_size // self.context.world_size)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for windows in share.split(per_batch):
            windows = windows.to(self.device)
            with self._autocast():
                _, loss = self.compiled(windows[:, :-1], windows[:, 1:])
            total += loss.double() * windows.size(0)
        return (distributed.all_reduce_sum(total, self.context) / len(self.val_windows)).item()

    def sample(self) -> str:
        """Up to ``sample_tokens`` tokens after an end-of-text token (as many as the context
        holds), drawn from a generator seeded by the seed and the step: the training's own
        random stream is left untouched."""
        length = min(self.config.sample_tokens, self.net.config.n_ctx - 1)
        prompt = torch.tensor([[self.tokenizer.eot_token]], device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.config.seed + self.step)
        ids = self.net.generate(prompt, length, temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, generator=generator)
        return self.tokenizer.decode(ids[0, 1:].tolist())

    # ---- files -------------------------------------------------------------------------------------

    def _common(self) -> dict:
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "model_config": dataclasses.asdict(self.net.config),
            "step": self.step,
        }

    def _save(self, improved: bool) -> None:
        if not self.context.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.net.state_dict()
        if improved:
            checkpoint.save({**self._common(), "model": state, "val_loss": self.best["val_loss"]}, self.out / "best.pt")
        checkpoint.save(
            {
                **self._common(),
                "model": state,
                "optimizer": self.optimizer.state_dict(),
                "windows": self.windows.state_dict(),
                "rng": checkpoint.rng_state({}),
                "max_steps": self.max_steps,
                "evals": self.evals,
                "samples": self.samples,
                "step_losses": self.step_losses,
                "step_lrs": self.step_lrs,
                "step_grad_norms": self.step_grad_norms,
                "best": self.best,
                "world_size": self.context.world_size,
            },
            self.out / "last.pt",
        )
        checkpoint.write_json(
            {
                "config": self.config.to_dict(),
                "model_config": dataclasses.asdict(self.net.config),
                "world_size": self.context.world_size,
                "max_steps": self.max_steps,
                "tokens_per_step": self.tokens_per_step,
                "best_step": self.best["step"],
                "best_val_loss": self.best["val_loss"],
                "evals": self.evals,
                "samples": self.samples,
                "step_losses": self.step_losses,
                "step_lrs": self.step_lrs,
                "step_grad_norms": self.step_grad_norms,
            },
            self.out / "metrics.json",
        )
        if plots.have_matplotlib():
            plots.plot_loss_curves(
                {
                    "train (each step)": (list(range(1, len(self.step_losses) + 1)), self.step_losses),
                    "validation": ([e["step"] for e in self.evals], [e["val_loss"] for e in self.evals]),
                },
                self.out / "curves.png",
            )

    def _record_sample(self) -> None:
        sample = self.sample()
        self.samples.append({"step": self.step, "text": sample})
        self.log(f"sample at step {self.step}:\n{sample}\n")
        if self.context.is_main:  # rewritten whole, so a resumed run does not repeat lost samples
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "samples.txt").write_text(
                "".join(f"=== step {s['step']}\n{s['text']}\n\n" for s in self.samples), encoding="utf-8"
            )

    # ---- the run ----------------------------------------------------------------------------------

    def _evaluate_and_save(self, train_losses: list[float], seconds: float) -> None:
        val_loss = self.evaluate()
        entry = {
            "step": self.step,
            "val_loss": val_loss,
            "train_loss": sum(train_losses) / len(train_losses) if train_losses else None,
            "lr": self.step_lrs[-1] if self.step_lrs else None,
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": len(train_losses) * self.tokens_per_step / seconds if seconds > 0 else None,
            "seconds": seconds,
        }
        self.evals.append(entry)
        improved = val_loss < self.best["val_loss"]
        if improved:
            self.best = {"step": self.step, "val_loss": val_loss}
        width = len(str(self.max_steps))
        trained = (
            ""
            if entry["train_loss"] is None
            else (
                f"  train loss {entry['train_loss']:.4f}  lr {entry['lr']:.3g}  {entry['tokens_per_s']:,.0f} tok/s  "
                f"{format_duration(seconds)}"
            )
        )
        self.log(
            f"step {self.step:>{width}}/{self.max_steps}  val loss {val_loss:.4f}{trained}"
            + ("  *best" if improved and self.step > 0 else "")
        )
        if self.step > 0:
            self._save(improved)

    def _next_stop(self) -> int:
        """The next step after which the run evaluates or samples (or ends)."""
        config = self.config
        stops = [(self.step // config.eval_interval + 1) * config.eval_interval, self.max_steps]
        if config.sample_interval:
            stops.append((self.step // config.sample_interval + 1) * config.sample_interval)
        return min(stops)

    def run(self) -> GPTTrainResult:
        config = self.config
        if self.step == 0:
            self._evaluate_and_save([], 0.0)  # the untrained model's loss starts the curve
        losses, seconds = [], 0.0  # of the steps since the last evaluation
        while self.step < self.max_steps:
            stop = self._next_stop()
            bar = progress_bar(
                stop - self.step,
                f"steps {self.step + 1}-{stop}",
                enabled=config.progress and self.context.is_main,
                unit="tok",
            )
            start = time.perf_counter()
            while self.step < stop:
                losses.append(self.train_step()[0])
                bar.update(self.tokens_per_step, sum(losses) / len(losses))
            seconds += time.perf_counter() - start
            bar.close()
            last = self.step == self.max_steps
            if config.sample_interval and (self.step % config.sample_interval == 0 or last):
                self._record_sample()
            if self.step % config.eval_interval == 0 or last:
                self._evaluate_and_save(losses, seconds)
                losses, seconds = [], 0.0
        self.log(
            f"best validation loss {self.best['val_loss']:.4f} at step {self.best['step']}; files: {self.out}/"
            "last.pt, best.pt, metrics.json"
            + (", curves.png" if plots.have_matplotlib() else "")
            + (", samples.txt" if self.samples else "")
        )
        return GPTTrainResult(
            self.evals,
            self.step_losses,
            self.step_lrs,
            self.step_grad_norms,
            self.samples,
            self.best["step"],
            self.best["val_loss"],
            self.max_steps,
            self.net,
            self.out,
        )


def fit_gpt(config: GPTTrainConfig | None = None, **overrides) -> GPTTrainResult:
    """Train as ``config`` says (a :class:`GPTTrainConfig`; keyword arguments override its fields).

    Under torchrun (``WORLD_SIZE`` > 1 in the environment) this process joins the process group
    and trains its share of every micro-batch with DDP. Raises :class:`ConfigError` (a
    ValueError naming the option) for settings that cannot work.
    """
    config = dataclasses.replace(config or GPTTrainConfig(), **overrides)
    source = config.check()
    return run_in_process_group(config.device, lambda device, context: _Run(config, source, device, context).run())
