"""The command line of ``fastdl train`` and ``python -m fastdl.train`` (the same arguments).

:func:`add_arguments` fills an argparse parser, :func:`config_from_args` turns the parsed
arguments into a :class:`TrainConfig`, :func:`run` trains. Building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import sys

from .config import DATA_KINDS_BUNDLED, DATA_KINDS_WITH_PATH, DEVICES, MODELS, ConfigError, TrainConfig

__all__ = ["add_arguments", "config_from_args", "run", "main"]

DESCRIPTION = "Train a ResNet with the course recipe (SGD momentum 0.9, weight decay 5e-4, cosine schedule)."
EPILOG = """examples:
  fastdl train gpt --help, fastdl train fast-rcnn --help: the language-model and detector trainers
  fastdl train resnet18 --data cifar10=~/data/cifar-10-batches-py --epochs 30
  fastdl train resnet10 --data digits --epochs 3 --out runs/digits
  torchrun --nproc_per_node=2 -m fastdl.train resnet18 --data cifar10=~/data --sync-bn"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and not any(action.default is none for none in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    kinds = ", ".join([f"{kind}=PATH" for kind in DATA_KINDS_WITH_PATH] + list(DATA_KINDS_BUNDLED))
    parser.add_argument("model", metavar="MODEL", help=f"one of {', '.join(MODELS)}")
    parser.add_argument(
        "--data",
        required=True,
        metavar="KIND[=PATH]",
        help=f"{kinds}; folder=PATH holds train/ and val/ class folders, or Tiny ImageNet",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="length of the cosine schedule")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="global batch, shared by the processes under torchrun",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="initial learning rate")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="SGD weight decay")
    parser.add_argument(
        "--device", default=defaults.device, metavar="|".join(DEVICES), help="auto: CUDA, else MPS, else CPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument(
        "--amp", action="store_true", help="autocast: float16 with gradient scaling on CUDA/MPS, bfloat16 on CPU"
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="threads decoding image files (folder data)"
    )
    parser.add_argument(
        "--out",
        default=defaults.out,
        metavar="DIR",
        help="folder for last.pt, best.pt, metrics.json, curves.png, predictions.png",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run saved in DIR/last.pt")
    parser.add_argument(
        "--patience",
        type=int,
        default=defaults.patience,
        help="stop after this many epochs without a better test accuracy (0: never)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="fixes the initial weights, the shuffling and the augmentation"
    )
    parser.add_argument("--limit-train", type=int, default=None, metavar="N", help="use N training images")
    parser.add_argument("--limit-test", type=int, default=None, metavar="N", help="use N test images")
    parser.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun, BatchNorm statistics over the global batch instead of each share",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one line per epoch (also when not printing to a terminal)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        device=args.device,
        compile=args.compile,
        channels_last=args.channels_last,
        amp=args.amp,
        workers=args.workers,
        out=args.out,
        resume=args.resume,
        patience=args.patience,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        sync_bn=args.sync_bn,
        progress=not args.no_progress,
    )


def train_checked(config, module: str, fit: str, prog: str) -> int:
    """Check ``config`` before torch is imported (a typo fails at once), then train with the function
    ``fit`` of ``fastdl.train.<module>``. A bad setting prints ``prog: error: ...`` and returns 2."""
    import importlib

    try:
        config.check()
        getattr(importlib.import_module(f"{__package__}.{module}"), fit)(config)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace, prog: str = "fastdl train") -> int:
    """Train from parsed arguments; a bad setting prints ``prog: error: ...`` and returns 2."""
    return train_checked(config_from_args(args), "loop", "fit", prog)


def build_parser(prog: str = "python -m fastdl.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter)
    add_arguments(parser)
    return parser


# Models with a trainer (and arguments) of their own: `fastdl train gpt ...`, `fastdl train fast-rcnn ...`.
OTHER_TRAINERS = {"gpt": "gpt_cli", "fast-rcnn": "detection_cli"}


def run_other_trainer(name: str, argv: list[str], prog: str) -> int:
    """Parse ``argv`` with the trainer of ``name`` (a key of OTHER_TRAINERS) and run it."""
    import importlib

    module = importlib.import_module(f"{__package__}.{OTHER_TRAINERS[name]}")
    parser = module.build_parser(prog)
    return module.run(parser.parse_args(argv), prog=parser.prog)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in OTHER_TRAINERS:
        sys.exit(run_other_trainer(argv[0], argv[1:], f"python -m fastdl.train {argv[0]}"))
    parser = build_parser()
    sys.exit(run(parser.parse_args(argv), prog=parser.prog))
