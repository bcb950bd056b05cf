"""The ``fastdl`` command line: ``info``, ``bench``, ``train``, ``generate``, ``detect`` and ``2048``."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def cmd_info(args) -> int:
    import torch

    import fastdl
    import fastdl.backends.cpu
    from fastdl import _loader
    from fastdl.ops import _library

    print(f"fastdl {fastdl.__version__}   torch {torch.__version__}   python {platform.python_version()}")
    print(
        f"cpu: {platform.machine()}, {torch.get_num_threads()} threads, torch capability {torch.backends.cpu.get_cpu_capability()}"
    )
    supported = fastdl.backends.cpu.supported_cpu_capabilities()[-1]
    print(f"fastdl CPU kernels: {fastdl.backends.cpu.get_cpu_capability()} (this CPU supports up to {supported})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)} (torch CUDA {torch.version.cuda})")
    else:
        print("cuda: not available" + (f" (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else ""))
    print(f"mps: {'available' if torch.backends.mps.is_available() else 'not available'}")
    print(f"CUDA kernels built: {'yes' if _loader.cuda_kernels_built() else 'no'}")
    print(f"triton: {'installed' if importlib.util.find_spec('triton') else 'not installed'}")
    print()
    rows = [("op", "CPU", "CUDA", "MPS")]
    rows += [
        (name, *(_library.implementation(name, d) for d in ("cpu", "cuda", "mps"))) for name in _library.public_ops()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    capability = fastdl.backends.cpu.get_cpu_capability()
    paths = fastdl.backends.cpu.kernel_paths(capability)
    width = max(map(len, paths))
    print()
    print(f"CPU path of each op at {capability} (float32):")
    for name, path in paths.items():
        print(f"  {name.ljust(width)}  {path}")
    return 0


def cmd_bench(args) -> int:
    from fastdl import bench

    return bench.run(args)


def cmd_train(args) -> int:
    from fastdl.train import cli as train_cli

    return train_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdl", description="fastdl: fast deep-learning kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, and which kernel serves each op on each device")
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="benchmark fastdl against eager PyTorch and named peers")
    bench.add_argument("--quick", action="store_true", help="small cases, few rounds (a few minutes on 2 cores)")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--ops", nargs="+", metavar="OP", help="only these ops (benchmark module names, e.g. roi_align)")
    bench.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: all cores)")
    bench.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory (no page faults on reallocated outputs), for both sides",
    )
    bench.add_argument("--out", default="bench-results", help="directory for the JSON results and the PNG chart")
    bench.set_defaults(func=cmd_bench)

    from fastdl.train import cli as train_cli

    train = sub.add_parser(
        "train",
        help="train a ResNet (CIFAR, MNIST, image folders, digits); "
        "`train gpt` and `train fast-rcnn` have their own options",
        description=train_cli.DESCRIPTION,
        epilog=train_cli.EPILOG,
        formatter_class=train_cli.HelpFormatter,
    )
    train_cli.add_arguments(train)
    train.set_defaults(func=cmd_train)

    from fastdl import generate as generate_cli

    generate = sub.add_parser(
        "generate",
        help="continue a prompt with a GPT-2 model",
        description=generate_cli.DESCRIPTION,
        epilog=generate_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate_cli.add_arguments(generate)
    generate.set_defaults(func=generate_cli.run)

    from fastdl.train import detect as detect_cli

    detect = sub.add_parser(
        "detect",
        help="draw a trained detector's boxes on images",
        description=detect_cli.DESCRIPTION,
        epilog=detect_cli.EPILOG,
        formatter_class=train_cli.HelpFormatter,
    )
    detect_cli.add_arguments(detect)
    detect.set_defaults(func=detect_cli.run)

    from fastdl.game2048 import cli as game_cli

    game_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    from fastdl.train import cli as train_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"] and argv[1:2] and argv[1] in train_cli.OTHER_TRAINERS:
        sys.exit(train_cli.run_other_trainer(argv[1], argv[2:], f"fastdl train {argv[1]}"))
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
