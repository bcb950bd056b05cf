"""The settings and the command line of ``fastdl train gpt`` (``python -m fastdl.train gpt``).

:class:`GPTTrainConfig` is one run; :meth:`GPTTrainConfig.check` turns an impossible value into
a :class:`~fastdl.train.config.ConfigError` naming the option. :func:`add_arguments` fills an
argparse parser, :func:`run` trains from its result. Nothing here imports torch, so a typo fails
before the slow imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

from .cli import HelpFormatter, train_checked
from .config import DEVICES, ConfigError

__all__ = [
    "GPTTrainConfig",
    "TOKENIZERS",
    "RECIPE_FIELDS",
    "DEFAULT_MAX_STEPS",
    "add_arguments",
    "config_from_args",
    "run",
    "build_parser",
    "main",
]

TOKENIZERS = ("bytes", "gpt2")
DEFAULT_MAX_STEPS = 2000  # when neither --max-steps nor --epochs is given

# The fields that decide the trajectory: a resumed run must keep them. The others (the length,
# the evaluation and sampling cadence, device, amp, compile, progress) may change.
RECIPE_FIELDS = (
    "data",
    "config",
    "init",
    "tokenizer",
    "block_size",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr",
    "warmup_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "dropout",
    "val_fraction",
    "seed",
)

DESCRIPTION = (
    "Train a GPT-2 language model: AdamW, linear warmup then cosine decay, gradient clipping and "
    "accumulation, periodic validation loss and samples."
)
EPILOG = """examples:
  fastdl train gpt --data pydoc --config bytes-tiny --tokenizer bytes --max-steps 2000
  fastdl train gpt --data text=~/books --tokenizer gpt2 --block-size 512 --batch-size 16 --grad-accum 4
  fastdl train gpt --data text=~/books --init ~/hf/gpt2 --tokenizer gpt2 --lr 3e-5 --min-lr 3e-6
  torchrun --nproc_per_node=2 -m fastdl.train gpt --data pydoc --device cpu"""


@dataclass
class GPTTrainConfig:
    """One GPT training run. The defaults train a small model on the bundled pydoc corpus with
    bytes as tokens, nanoGPT's optimiser settings (AdamW betas 0.9/0.95, weight decay 0.1,
    gradient norm clipped at 1).

    Attributes:
        data: ``"pydoc"`` (CPython's help topics, offline) or ``"text=PATH"`` (a UTF-8 file, or a
            folder of them).
        config: the model preset of ``GPTConfig.from_name`` ("bytes-tiny", "gpt2-tiny", "gpt2", ...);
            its vocabulary becomes the tokenizer's and its context ``block_size``. Ignored with
            ``init`` (apart from being recorded).
        init: a Hugging Face GPT-2 folder to start from (``GPT.from_pretrained``) instead of random
            weights.
        tokenizer: "bytes" (256 byte values and an end-of-text token), "gpt2" (GPT-2's BPE), or
            the path of a vocabulary (``fastdl.data.tokenizer.get_tokenizer``).
        block_size: ``T``, the tokens a training window feeds the model.
        batch_size: windows per micro-step over all processes (each process takes a share).
        grad_accum: micro-steps per optimiser step: a step trains on
            ``batch_size * grad_accum * block_size`` tokens.
        max_steps, epochs: the run's length in optimiser steps, or in passes over the training
            split (at most one of them; neither: :data:`DEFAULT_MAX_STEPS` steps).
        lr, min_lr, warmup_steps: the learning rate rises linearly to ``lr`` over ``warmup_steps``,
            then follows half a cosine down to ``min_lr`` at the last step.
        weight_decay, beta1, beta2: AdamW's; weight decay applies to the parameters of 2 or more
            dimensions only (matrices and embeddings; not biases or LayerNorm).
        grad_clip: the largest global gradient norm (0: no clipping).
        dropout: the model's dropout probability (None: the preset's).
        val_fraction: the end of the token stream kept for validation.
        eval_interval: optimiser steps between validations (and checkpoints).
        eval_steps: validation micro-batches of ``batch_size`` windows (at most the whole split).
        sample_interval, sample_tokens: print a sample of this many tokens every
            ``sample_interval`` steps (0: never).
        amp: bfloat16 autocast where the device supports it (CPU, CUDA with bfloat16).
        compile: ``torch.compile`` the model.
        device: "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" or "mps".
        seed: fixes the initial weights, the windows, dropout and the samples.
        out: the folder of ``last.pt``, ``best.pt``, ``metrics.json``, ``curves.png``, ``samples.txt``.
        resume: continue from ``out/last.pt``.
        progress: a progress bar per evaluation interval when printing to a terminal.
    """

    data: str = "pydoc"
    config: str = "bytes-tiny"
    init: str | None = None
    tokenizer: str = "bytes"
    block_size: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float | None = None
    val_fraction: float = 0.1
    eval_interval: int = 250
    eval_steps: int = 20
    sample_interval: int = 500
    sample_tokens: int = 200
    amp: bool = False
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    out: str = "gpt-results"
    resume: bool = False
    progress: bool = True

    def data_source(self) -> str:
        """What ``fastdl.data.text.read_documents`` reads: "pydoc" or the expanded path."""
        data = self.data
        if data == "pydoc":
            return data
        kind, has_path, path = data.partition("=") if isinstance(data, str) else ("", "", "")
        if kind.strip().lower() != "text" or not has_path:
            raise ConfigError(f"--data {data}: expected text=PATH (a UTF-8 file or a folder of them) or pydoc")
        if not path:
            raise ConfigError(f"--data {data}: text needs the file or folder to read: --data text=PATH")
        expanded = os.path.expanduser(path)
        if not os.path.exists(expanded):
            raise ConfigError(f"--data {data}: the path {expanded!r} does not exist")
        return expanded

    def check(self) -> str:
        """Raise :class:`ConfigError` for the first impossible setting; return the data source."""
        source = self.data_source()
        if not isinstance(self.config, str) or not self.config:
            raise ConfigError(f"--config: expected a model preset name such as gpt2-tiny, got {self.config!r}")
        if self.init is not None and not os.path.isdir(os.path.expanduser(self.init)):
            raise ConfigError(f"--init: {self.init!r} is not a folder (a Hugging Face GPT-2 checkpoint folder)")
        if self.tokenizer not in TOKENIZERS and not os.path.exists(os.path.expanduser(str(self.tokenizer))):
            raise ConfigError(
                f"--tokenizer: unknown tokenizer {self.tokenizer!r}; expected bytes or gpt2, or the "
                "path of a vocabulary (vocab.json, a .tiktoken file, or a folder with one)"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"--device: unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        for name in ("block_size", "batch_size", "grad_accum", "eval_interval", "eval_steps", "sample_tokens"):
            _positive(name, getattr(self, name))
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError(f"--max-steps {self.max_steps} and --epochs {self.epochs}: give one of them, not both")
        for name in ("max_steps", "epochs"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("warmup_steps", "sample_interval"):
            _non_negative_int(name, getattr(self, name))
        _finite("lr", self.lr, low=0, low_open=True)
        _finite("min_lr", self.min_lr, low=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr: must be at most --lr {self.lr}, got {self.min_lr}")
        _finite("weight_decay", self.weight_decay, low=0)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ConfigError(f"--{name}: must lie in [0, 1), got {value!r}")
        _finite("grad_clip", self.grad_clip, low=0)
        if self.dropout is not None and not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"--dropout: must lie in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ConfigError(f"--val-fraction: must lie in (0, 1), got {self.val_fraction!r}")
        if self.resume:
            last = os.path.join(self.out, "last.pt")
            if not os.path.isfile(last):
                raise ConfigError(
                    f"--resume: no checkpoint {last!r} (--out {self.out}); train without --resume "
                    "first, or pass the --out folder of the run to continue"
                )
        return source

    def to_dict(self) -> dict:
        """The settings as plain values (stored in checkpoints and metrics.json)."""
        return dataclasses.asdict(self)


def flag(field: str) -> str:
    """``"block_size"`` -> ``"--block-size"``."""
    return "--" + field.replace("_", "-")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag(name)}: must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{flag(name)}: must be an integer >= 0, got {value!r}")


def _finite(name: str, value, low: float, low_open: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < low or (low_open and value == low):
        raise ConfigError(f"{flag(name)}: must be a finite number {'>' if low_open else '>='} {low:g}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastdl train gpt`` (the parser needs :class:`HelpFormatter` to show defaults)."""
    defaults = GPTTrainConfig()
    add = parser.add_argument
    add(
        "--data",
        default=defaults.data,
        metavar="text=PATH|pydoc",
        help="a UTF-8 text file or a folder of them, or pydoc: CPython's help topics (about 460 KB, offline)",
    )
    add("--config", default=defaults.config, metavar="PRESET", help="model preset of GPTConfig.from_name")
    add("--init", default=None, metavar="HF_DIR", help="start from a Hugging Face GPT-2 folder's weights")
    add(
        "--tokenizer",
        default=defaults.tokenizer,
        metavar="bytes|gpt2|PATH",
        help="bytes: the UTF-8 bytes and an end-of-text token; gpt2: GPT-2's BPE; PATH: a vocab.json or .tiktoken "
        "file (or a folder with one, such as a Hugging Face model's)",
    )
    add("--block-size", type=int, default=defaults.block_size, metavar="T", help="tokens per training window")
    add(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        metavar="B",
        help="windows per micro-step, shared by the processes under torchrun",
    )
    add("--grad-accum", type=int, default=defaults.grad_accum, metavar="K", help="micro-steps per optimiser step")
    add(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help=f"optimiser steps to train (default {DEFAULT_MAX_STEPS}, unless --epochs)",
    )
    add("--epochs", type=int, default=None, metavar="E", help="passes over the training split instead of --max-steps")
    add("--lr", type=float, default=defaults.lr, help="peak learning rate, reached after the warmup")
    add("--min-lr", type=float, default=defaults.min_lr, help="learning rate at the end of the cosine")
    add("--warmup-steps", type=int, default=defaults.warmup_steps, metavar="N", help="steps of linear warmup")
    add(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help="AdamW weight decay of the 2-D parameters (matrices, embeddings)",
    )
    add("--beta1", type=float, default=defaults.beta1, help="AdamW beta1")
    add("--beta2", type=float, default=defaults.beta2, help="AdamW beta2")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="largest gradient norm (0: no clipping)")
    add("--dropout", type=float, default=None, help="dropout probability (default: the preset's)")
    add(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="share of the token stream, at its end, kept for validation",
    )
    add(
        "--eval-interval",
        type=int,
        default=defaults.eval_interval,
        metavar="N",
        help="steps between validations and checkpoints",
    )
    add(
        "--eval-steps",
        type=int,
        default=defaults.eval_steps,
        metavar="N",
        help="validation micro-batches of --batch-size windows (at most the whole split)",
    )
    add(
        "--sample-interval",
        type=int,
        default=defaults.sample_interval,
        metavar="N",
        help="steps between printed samples (0: none)",
    )
    add("--sample-tokens", type=int, default=defaults.sample_tokens, metavar="N", help="tokens per sample")
    add("--amp", action="store_true", help="bfloat16 autocast where supported (CPU, CUDA with bfloat16)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--device", default=defaults.device, metavar="|".join(DEVICES), help="auto: CUDA, else MPS, else CPU")
    add("--seed", type=int, default=defaults.seed, help="fixes the initial weights, the windows, dropout, samples")
    add(
        "--out",
        default=defaults.out,
        metavar="DIR",
        help="folder for last.pt, best.pt, metrics.json, curves.png, samples.txt",
    )
    add("--resume", action="store_true", help="continue the run saved in DIR/last.pt")
    add("--no-progress", action="store_true", help="no progress bar: one line per evaluation")


def config_from_args(args: argparse.Namespace) -> GPTTrainConfig:
    names = [f.name for f in dataclasses.fields(GPTTrainConfig) if f.name != "progress"]
    return GPTTrainConfig(**{name: getattr(args, name) for name in names}, progress=not args.no_progress)


def run(args: argparse.Namespace, prog: str = "fastdl train gpt") -> int:
    """Train from parsed arguments; a bad setting prints ``prog: error: ...`` and returns 2."""
    return train_checked(config_from_args(args), "gpt", "fit_gpt", prog)


def build_parser(prog: str = "python -m fastdl.train gpt") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m fastdl.train gpt") -> None:
    parser = build_parser(prog)
    sys.exit(run(parser.parse_args(argv), prog=parser.prog))


if __name__ == "__main__":  # python -m fastdl.train.gpt_cli, which torchrun can also start
    main()
