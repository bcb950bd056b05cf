"""``fastdl bench``: run the pytest-benchmark modules and summarise fastdl against the baselines.

Every benchmark records its op, named case and implementation (see ``benchmarks/_common.py``);
here each baseline is paired with fastdl on the same case and the ratio of medians is reported.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path


def benchmark_dir() -> Path:
    return Path(str(resources.files("fastdl.benchmarks")))


def run(args) -> int:
    import pytest

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"bench-{args.device}.json"
    bench_dir = benchmark_dir()
    targets = [str(bench_dir / f"bench_{op}.py") for op in args.ops] if args.ops else [str(bench_dir)]
    for t in targets:
        if not os.path.exists(t):
            raise SystemExit(f"fastdl bench: no benchmark module {t}")
    pytest_args = [
        *targets,
        "-o",
        "python_files=bench_*.py",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--device={args.device}",
        f"--threads={args.threads}",
        *(["--keep-freed-memory"] if args.keep_freed_memory else []),
        f"--benchmark-json={raw}",
        "--benchmark-disable-gc",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=name",
    ]
    if args.quick:
        pytest_args += ["--quick", "--benchmark-max-time=0.5", "--benchmark-min-rounds=3"]
    else:
        pytest_args += ["--benchmark-max-time=2", "--benchmark-min-rounds=5"]
    code = pytest.main(pytest_args)
    if not raw.exists():
        return int(code) or 1
    rows = summarise(json.loads(raw.read_text()))
    print()
    print(format_table(rows))
    chart = out / f"bench-{args.device}.png"
    if rows and plot(rows, chart):
        print(f"\nraw results: {raw}\nchart: {chart}")
    return int(code)


def summarise(data: dict) -> list[dict]:
    """One row per (op, case, baseline): medians, speedup = baseline / fastdl, fastdl's error."""
    by_case: dict[tuple[str, str], dict[str, dict]] = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "op" in info:
            by_case.setdefault((info["op"], info["case"]), {})[info["impl"]] = dict(
                median=b["stats"]["median"], err=info.get("max_abs_err"), peak_mb=info.get("peak_mb")
            )
    rows = []
    for (op, case), impls in sorted(by_case.items()):
        mine = impls.get("fastdl")
        for name, base in impls.items():
            if name == "fastdl" or mine is None:
                continue
            rows.append(
                dict(
                    op=op,
                    case=case,
                    baseline=name,
                    baseline_ms=base["median"] * 1e3,
                    fastdl_ms=mine["median"] * 1e3,
                    speedup=base["median"] / mine["median"],
                    max_abs_err=mine["err"],
                    fastdl_peak_mb=mine["peak_mb"],
                    baseline_peak_mb=base["peak_mb"],
                )
            )
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["op", "case", "baseline", "baseline ms", "fastdl ms", "speedup", "max abs err", "peak MB (base/fastdl)"]
    lines = [header]
    for r in rows:
        peak = "" if r["fastdl_peak_mb"] is None else f"{r['baseline_peak_mb'] or 0:.0f} / {r['fastdl_peak_mb']:.0f}"
        err = "" if r["max_abs_err"] is None else f"{r['max_abs_err']:.1e}"
        lines.append(
            [
                r["op"],
                r["case"],
                r["baseline"],
                f"{r['baseline_ms']:.2f}",
                f"{r['fastdl_ms']:.2f}",
                f"{r['speedup']:.2f}x",
                err,
                peak,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no chart)")
        return False
    labels = [f"{r['op']} {r['case']}\nvs {r['baseline']}" for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(labels, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup of fastdl over the baseline (median time ratio, log scale)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
