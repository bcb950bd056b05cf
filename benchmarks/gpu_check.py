"""The GPU check: build fastdl with its CUDA kernels, test and time every CUDA and Triton kernel,
all inside one 10-minute run.

    bash benchmarks/gpu_check.sh --out gpu-check-results

Stages: build, tests (then compute-sanitizer on one quick test per .cu kernel, where time allows)
and benchmarks, each under its own time limit. What every stage wrote is summarised in
``summary.md`` even when a stage hangs or fails. ``--dry-run`` runs the same pipeline with
stand-in commands on a machine without a GPU. See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Every op with a CUDA or Triton kernel (bench_game2048 times the CPU engine only).
BENCHMARKED_OPS = ["attention", "conv2d", "roi_align", "roi_pool", "nms", "lstm", "models"]
# Run whole: on a GPU every test in them runs the Triton kernels on the device.
TRITON_TEST_MODULES = ["tests/test_attention_triton.py", "tests/test_conv2d_triton.py"]
# One quick test per .cu kernel (csrc/ops/*/cuda.cu); memcheck makes kernels 10-100x slower.
SANITIZER_TESTS = {
    "roi_align": [
        "tests/test_roi_align.py::test_cuda_matches_cpu",
        "tests/test_roi_align.py::test_cuda_deterministic_backward_matches_atomic",
    ],
    "roi_pool": ["tests/test_roi_pool.py::test_cuda_deterministic_backward"],
    "nms": ["tests/test_nms.py::test_cuda_matches_cpu[65]"],  # 65 boxes: a partial second 64-bit mask word
    "lstm": ["tests/test_lstm.py::test_cuda_reduced_precision"],
}
# Less than this is not enough for torch to start under memcheck: the sub-stage is skipped instead.
MIN_SANITIZER_SECONDS = 20.0
STAGES = ("build", "tests", "sanitizer", "benchmarks")
FAILURES_LISTED = 30
BUILD_ERRORS_LISTED = 30

TORCH_PROBE = """
import json, torch
info = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
print(json.dumps(info))
"""

# What the dry run's stand-ins write in place of pytest's JUnit XML and pytest-benchmark's JSON,
# so that the report is built from files of the real formats.
DRY_RUN_JUNIT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="1" failures="0" '
    'errors="0" skipped="0"><testcase classname="{module}" name="test_dry_run" time="0.01"/></testsuite></testsuites>'
)
DRY_RUN_BENCHMARKS = json.dumps(
    {
        "benchmarks": [
            {
                "name": f"test_nms[random-1k-{impl}]",
                "params": {"case": "random-1k", "impl": impl},
                "extra_info": {"op": "nms", "case": "random-1k", "impl": impl, "max_abs_err": 0.0, "threads": 1},
                "stats": {"median": median, "rounds": 5},
            }
            for impl, median in (("fastdl", 0.0005), ("eager", 0.04))
        ]
    }
)


@dataclass
class Command:
    argv: list[str]
    log: Path
    env: dict[str, str | None] = field(default_factory=dict)  # changes to os.environ; None removes
    artifact: Path | None = None  # the report file it writes (JUnit XML, benchmark JSON)


@dataclass
class Stage:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    limit: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    dry_run: bool
    environment: list[tuple[str, str]] = field(default_factory=list)
    stages: dict[str, Stage] = field(default_factory=lambda: {n: Stage(n) for n in STAGES})
    failures: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (test id, kind, first lines)
    build_errors: list[str] = field(default_factory=list)
    benchmarks: list[dict] = field(default_factory=list)

    def passed(self) -> bool:
        ok = {"build": ("ok", "skipped"), "tests": ("ok",), "sanitizer": ("ok", "skipped"), "benchmarks": ("ok",)}
        return all(self.stages[name].status in allowed for name, allowed in ok.items())


class Budget:
    """Stage time limits: each stage's own, cut short when earlier stages ran late, so that the
    whole run ends by the sum of the build, test and benchmark budgets (counted from the start)."""

    def __init__(self, total: float):
        self.deadline = time.monotonic() + total

    def allow(self, own: float, reserved_after: float) -> float:
        """At most ``own`` seconds, leaving ``reserved_after`` for the stages still to come."""
        return max(0.0, min(own, self.deadline - time.monotonic() - reserved_after))


# ---- running commands under a time limit -------------------------------------------------------


def environment(changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def signal_groups(procs: list[subprocess.Popen], sig: int, only_running: bool = True) -> None:
    for p in procs:
        if only_running and p.poll() is not None:
            continue
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass


def run_commands(commands: list[Command], timeout: float) -> tuple[list[int | None], bool]:
    """Run ``commands`` side by side, each in its own process group, for at most ``timeout`` s.

    Each command's old report file is removed first, so a report is never one from an earlier
    run. Shortly before the deadline each group still running gets SIGINT, on which pytest still
    writes its JUnit XML and benchmark JSON; at the deadline every such group is killed, with
    whatever it started (nvcc under pip, a pytest under compute-sanitizer). Returns the exit
    codes (negative: killed by that signal) and whether the deadline was reached.
    """
    grace = min(10.0, timeout / 4)
    start = time.monotonic()
    procs, logs = [], []
    interrupted = deadline_reached = False
    try:
        for c in commands:
            if c.artifact is not None:
                c.artifact.unlink(missing_ok=True)
            c.log.parent.mkdir(parents=True, exist_ok=True)
            log = c.log.open("w")
            logs.append(log)
            changes = [f"{k}={'' if v is None else shlex.quote(v)}" for k, v in c.env.items()]
            log.write(f"$ {' '.join([*changes, shlex.join(c.argv)])}\n")
            log.flush()
            procs.append(
                subprocess.Popen(
                    c.argv,
                    cwd=REPO,
                    env=environment(c.env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        while any(p.poll() is None for p in procs):
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                deadline_reached = True
                break
            if not interrupted and elapsed >= timeout - grace:
                signal_groups(procs, signal.SIGINT)
                interrupted = True
            time.sleep(0.05)
    finally:
        # After an interrupt the leader may be gone while its children still run: kill every group.
        signal_groups(procs, signal.SIGKILL, only_running=not interrupted)
        for p in procs:
            p.wait()
        timed_out = interrupted or deadline_reached
        for p, log in zip(procs, logs):
            ending = f"stopped at the stage limit of {timeout:.0f} s" if timed_out else "finished"
            log.write(f"\n[{ending}, exit code {p.returncode}, {time.monotonic() - start:.1f} s]\n")
            log.close()
    return [p.returncode for p in procs], timed_out


def stand_in(command: Command, hang: bool, artifact_text: str | None, printed: str = "") -> Command:
    """What --dry-run runs instead of ``command``: print it, then either write a small report file
    of the real format where the real command would, or hang like a process stuck in a CUDA call
    (ignoring SIGINT, so only the kill at the stage limit ends it)."""
    code = [
        "import os, pathlib, signal, time",
        f"print('dry run, pid', os.getpid(), 'instead of:', {shlex.join(command.argv)!r}, flush=True)",
    ]
    if hang:
        code += ["signal.signal(signal.SIGINT, signal.SIG_IGN)", "time.sleep(3600)"]
    if printed:
        code.append(f"print({printed!r})")
    if command.artifact is not None and artifact_text is not None:
        code.append(f"pathlib.Path({str(command.artifact)!r}).write_text({artifact_text!r})")
    return Command([sys.executable, "-c", "\n".join(code)], command.log, {}, command.artifact)


def run_stage(stage: Stage, commands: list[Command], limit: float) -> list[int | None]:
    """Run a stage's commands and record its time and status (ok, failed or timed out)."""
    stage.limit = limit
    if limit <= 0:
        stage.status = "skipped"
        stage.notes.append("no time left")
        return []
    print(f"== {stage.name}: {len(commands)} command(s), limit {limit:.0f} s", flush=True)
    start = time.monotonic()
    codes, timed_out = run_commands(commands, limit)
    stage.seconds = time.monotonic() - start
    stage.status = "timed out" if timed_out else "ok" if all(c == 0 for c in codes) else "failed"
    if timed_out:
        stage.notes.append(f"killed at its limit of {limit:.0f} s")
    print(f"== {stage.name}: {stage.status} in {stage.seconds:.1f} s", flush=True)
    return codes


# ---- reading what the stages wrote -------------------------------------------------------------


def first_lines(element: ET.Element, count: int = 3) -> list[str]:
    """The gist of a JUnit <failure> or <error>: pytest's ``E`` lines, else its message."""
    text = element.text or ""
    explained = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    message = [line.strip() for line in (element.get("message") or "").splitlines() if line.strip()]
    lines = explained or message or [line.strip() for line in text.splitlines() if line.strip()]
    return [line[:200] for line in lines[:count]]


def parse_junit(path: Path) -> tuple[dict[str, int], list[tuple[str, str, list[str]]]]:
    """Counts of passed, failed, skipped and errors in a JUnit XML file, and for each failure or
    error its test id, its kind and its first lines."""
    counts = dict(passed=0, failed=0, skipped=0, errors=0)
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the placeholder pytest writes when interrupted before any test ended
            continue
        test_id = f"{case.get('classname')}::{case.get('name')}"
        outcomes = {child.tag: child for child in case}
        for kind in ("failure", "error"):
            if kind in outcomes:
                failures.append((test_id, kind, first_lines(outcomes[kind])))
        if "failure" in outcomes:
            counts["failed"] += 1
        elif "error" in outcomes:
            counts["errors"] += 1
        elif "skipped" in outcomes:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def merge_junit(parts: list[Path], target: Path) -> None:
    merged = ET.Element("testsuites")
    for part in parts:
        merged.extend(list(ET.parse(part).getroot().iter("testsuite")))
    ET.ElementTree(merged).write(target, encoding="utf-8", xml_declaration=True)


def summarise_benchmarks(data: dict) -> list[dict]:
    """One row per (op, case, baseline) of a pytest-benchmark JSON written by benchmarks/, as
    ``fastdl bench`` pairs them (``_common.record`` puts op, case and impl in extra_info).

    ratio = baseline median / fastdl median (above 1: fastdl is faster). TFLOP/s where the
    benchmark recorded the floating-point operations of one call as ``extra_info["flops"]``.
    """
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "op" in info:
            impls = cases.setdefault((info["op"], info["case"]), {})
            impls[info["impl"]] = dict(median=b["stats"]["median"], flops=info.get("flops"))

    def tflops(entry):
        return None if entry["flops"] is None else entry["flops"] / entry["median"] / 1e12

    rows = []
    for (op, case), impls in sorted(cases.items()):
        mine = impls.get("fastdl")
        if mine is None:
            continue
        for name, base in sorted(impls.items()):
            if name != "fastdl":
                rows.append(
                    dict(
                        op=op,
                        case=case,
                        baseline=name,
                        baseline_ms=base["median"] * 1e3,
                        fastdl_ms=mine["median"] * 1e3,
                        ratio=base["median"] / mine["median"],
                        fastdl_tflops=tflops(mine),
                        baseline_tflops=tflops(base),
                    )
                )
    return rows


def error_lines(log: Path, limit: int = BUILD_ERRORS_LISTED) -> list[str]:
    """The build log's lines that name an error (compiler, CMake, pip), else its last lines."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line.strip() for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)]
    return (errors or [line.strip() for line in lines[-limit:]])[:limit]


def pytest_summary_lines(log: Path) -> list[tuple[str, str, list[str]]]:
    """pytest's short summary (``FAILED id - message``, ``ERROR ...``) in a log, as failures, for
    runs whose report file is missing or that write none (the benchmarks)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    found = []
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind in ("FAILED", "ERROR") and "::" in rest:
            test_id, _, message = rest.partition(" - ")
            found.append((test_id, kind.lower(), [message[:200]] if message else []))
    return found


def last_test_started(log: Path) -> list[tuple[str, str, list[str]]]:
    """The last test a ``pytest -v`` log shows starting, as a failure: the one a process ended
    without a report was most likely stuck in."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in reversed(lines):
        test_id, _, rest = line.partition(" ")
        if "::" in test_id and not line.startswith(("FAILED ", "ERROR ")):
            return [(test_id, "last test started before the process ended", [rest.strip()[:200]])]
    return []


# ---- environment ---------------------------------------------------------------------------------


def command_output(argv: list[str], timeout: float = 30) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def find_compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else beside nvcc (CUDA toolkits do not always put it on PATH)."""
    found = shutil.which("compute-sanitizer")
    nvcc = shutil.which("nvcc")
    if found is None and nvcc is not None:
        beside = Path(nvcc).resolve().parent / "compute-sanitizer"
        found = str(beside) if beside.exists() else None
    return found


def torch_probe() -> dict:
    """torch's CUDA and cuDNN versions and the device, from a child process (a wedged driver
    hangs there, under a timeout, not here)."""
    output = command_output([sys.executable, "-c", TORCH_PROBE], timeout=60)
    try:
        return json.loads(output.splitlines()[-1]) if output else {}
    except ValueError:
        return {}


def probe_environment(dry_run: bool) -> list[tuple[str, str]]:
    """GPU, driver, library versions and CPU, for the top of summary.md. The dry run does not
    start torch (it would only find no GPU)."""
    gpus = (
        command_output(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]) or ""
    ).splitlines()
    probe = {} if dry_run else torch_probe()
    if gpus:
        name, _, driver = gpus[0].partition(",")
        gpu = name.strip() + (f" (x{len(gpus)})" if len(gpus) > 1 else "")
        driver = driver.strip()
    else:
        gpu = probe.get("device") or ("not probed (dry run)" if dry_run else "none found")
        driver = "unknown (no nvidia-smi)"
    nvcc = (command_output(["nvcc", "--version"]) or "not found").splitlines()
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("commit", command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"),
        ("GPU", gpu + (f", {probe['capability']}" if "capability" in probe else "")),
        ("driver", driver),
        (
            "torch",
            package_version("torch") + (f", CUDA {probe['cuda']}, cuDNN {probe['cudnn']}" if "cuda" in probe else ""),
        ),
        ("triton", package_version("triton")),
        ("torchvision", package_version("torchvision")),
        ("nvcc", next((line for line in nvcc if "release" in line), nvcc[-1])),
        ("compute-sanitizer", find_compute_sanitizer() or "not found"),
        ("CPU", f"{cpu_model()}, {os.cpu_count()} cores"),
        ("python", platform.python_version()),
    ]


# ---- the stages ------------------------------------------------------------------------------------


def build(args, report: Report, limit: float) -> bool:
    """pip install with the CUDA kernels; the compiler's error lines go to the summary."""
    stage = report.stages["build"]
    if args.skip_build:
        stage.status = "skipped"
        stage.notes.append("--skip-build")
        return True
    if not args.dry_run and importlib.util.find_spec("scikit_build_core") is None:
        stage.status = "failed"
        stage.notes.append("scikit-build-core is not installed: `pip install --no-build-isolation` needs it")
        return False
    command = Command(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "."],
        Path(args.out) / "build.log",
        {
            "FASTDL_CUDA": "ON",
            "CMAKE_ARGS": f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}",
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count()),
        },
    )
    if args.dry_run:
        command = stand_in(command, args.dry_run_hang == "build", None)
    run_stage(stage, [command], limit)
    if stage.status not in ("ok", "skipped"):
        report.build_errors = error_lines(command.log)
    return stage.status == "ok"


def test_modules() -> list[str]:
    """Test modules that can have CUDA tests (this check's own test is CPU-only)."""
    return sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").glob("test_*.py")
        if p.name != "test_gpu_check.py" and "cuda" in p.read_text()
    )


def tests(args, report: Report, limit: float) -> None:
    """Every CUDA test, one pytest per module side by side (Triton compiles use the CPU cores):
    the Triton modules whole, elsewhere the tests whose id or marks say cuda (``-k cuda`` covers
    ``@pytest.mark.cuda``, ``test_cuda_*`` and the ``cuda`` case of ``DEVICES``)."""
    stage = report.stages["tests"]
    out = Path(args.out)
    modules = test_modules()
    threads = str(max(1, (os.cpu_count() or 1) // max(1, len(modules))))  # CPU references, one process per module
    commands = []
    for module in modules:
        part = out / "tests" / Path(module).stem
        command = Command(
            [
                sys.executable,
                "-m",
                "pytest",
                module,
                "-v",
                "-rfE",
                "-p",
                "no:cacheprovider",
                "-p",
                "benchmarks.per_test_timeout",
                f"--per-test-timeout={args.per_test_timeout:g}",
                f"--junitxml={part}.xml",
                *([] if module in TRITON_TEST_MODULES else ["-k", "cuda"]),
            ],
            part.with_suffix(".log"),
            {"TRITON_INTERPRET": None, "OMP_NUM_THREADS": threads},
            part.with_suffix(".xml"),
        )
        if args.dry_run:
            command = stand_in(command, args.dry_run_hang == "tests", DRY_RUN_JUNIT.format(module=module))
        commands.append(command)
    codes = run_stage(stage, commands, limit)
    if stage.status == "skipped":
        return

    totals = dict(passed=0, failed=0, skipped=0, errors=0)
    reports, unreported = [], []
    (out / "junit.xml").unlink(missing_ok=True)
    with (out / "tests.log").open("w") as combined:
        for command, code in zip(commands, codes):
            combined.write(f"==== {command.log.stem} ====\n{command.log.read_text(errors='replace')}\n")
            try:
                counts, failures = parse_junit(command.artifact)
            except (OSError, ET.ParseError):  # ended (per-test limit) or killed before pytest wrote it
                unreported.append(f"{command.log.stem} (exit code {code})")
                report.failures += pytest_summary_lines(command.log) + last_test_started(command.log)
                continue
            reports.append(command.artifact)
            report.failures += failures
            totals = {k: totals[k] + counts[k] for k in totals}
    if reports:
        merge_junit(reports, out / "junit.xml")
    stage.notes.insert(0, ", ".join(f"{n} {k}" for k, n in totals.items()))
    if unreported:
        named = ", ".join(unreported) if len(unreported) <= 3 else f"{len(unreported)} modules"
        stage.notes.append(f"no report from {named}: see tests.log")
    elif not totals["passed"]:
        stage.notes.append("no test passed: is the GPU visible?")
    # exit code 1: tests failed (counted above); 5: -k selected nothing in that module
    ran = all(code in (0, 1, 5) for code in codes) and not unreported
    if stage.status != "timed out":
        clean = ran and totals["passed"] and not (totals["failed"] or totals["errors"])
        stage.status = "ok" if clean else "failed"


def sanitizer(args, report: Report, limit: float) -> None:
    """compute-sanitizer memcheck on SANITIZER_TESTS, without torch's caching allocator (which
    would hide an overrun inside a cached block)."""
    stage = report.stages["sanitizer"]
    tool = "compute-sanitizer" if args.dry_run else find_compute_sanitizer()
    if tool is None:
        stage.status = "skipped"
        stage.notes.append("compute-sanitizer not found")
        return
    if limit < min(MIN_SANITIZER_SECONDS, args.sanitizer_timeout / 2):
        stage.status, stage.limit = "skipped", limit
        stage.notes.append(f"only {limit:.0f} s left before the benchmarks")
        return
    out = Path(args.out)
    test_ids = [test_id for ids in SANITIZER_TESTS.values() for test_id in ids]
    command = Command(
        [
            tool,
            "--tool",
            "memcheck",
            "--error-exitcode",
            "1",
            "--target-processes",
            "all",
            "--print-limit",
            "20",
            sys.executable,
            "-m",
            "pytest",
            *test_ids,
            "-v",
            "-rfE",
            "-p",
            "no:cacheprovider",
            f"--junitxml={out / 'sanitizer.xml'}",
        ],
        out / "sanitizer.log",
        {"TRITON_INTERPRET": None, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        out / "sanitizer.xml",
    )
    if args.dry_run:
        command = stand_in(
            command,
            args.dry_run_hang == "sanitizer",
            DRY_RUN_JUNIT.format(module="tests.test_nms"),
            printed="========= ERROR SUMMARY: 0 errors",
        )
    run_stage(stage, [command], limit)
    if stage.status == "skipped":
        return
    log = command.log.read_text(errors="replace")
    memcheck_errors = sum(int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log))
    stage.notes.append(f"{memcheck_errors} memcheck errors")
    try:
        counts, failures = parse_junit(command.artifact)
    except (OSError, ET.ParseError):
        stage.notes.append("no pytest report")
        return
    stage.notes.append(", ".join(f"{n} {k}" for k, n in counts.items()))
    report.failures += [(test_id, f"{kind} under memcheck", lines) for test_id, kind, lines in failures]


def benchmarks(args, report: Report, limit: float) -> None:
    """``fastdl bench --device cuda --quick`` over BENCHMARKED_OPS; its JSON and chart go to --out."""
    stage = report.stages["benchmarks"]
    out = Path(args.out)
    command = Command(
        [
            sys.executable,
            "-m",
            "fastdl",
            "bench",
            "--device",
            "cuda",
            "--quick",
            "--ops",
            *BENCHMARKED_OPS,
            "--out",
            str(out),
        ],
        out / "bench.log",
        {"TRITON_INTERPRET": None},
        out / "bench-cuda.json",
    )
    if args.dry_run:
        command = stand_in(command, args.dry_run_hang == "benchmarks", DRY_RUN_BENCHMARKS)
    run_stage(stage, [command], limit)
    if stage.status == "skipped":
        return
    report.failures += [
        (test_id, f"benchmark {kind}", lines) for test_id, kind, lines in pytest_summary_lines(command.log)
    ]
    try:
        report.benchmarks = summarise_benchmarks(json.loads(command.artifact.read_text()))
    except (OSError, ValueError, KeyError):
        stage.notes.append("no benchmark JSON")
        if stage.status == "ok":
            stage.status = "failed"
        return
    stage.notes.append(f"comparisons: {len(report.benchmarks)}")


# ---- the summary -------------------------------------------------------------------------------------


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(report: Report) -> str:
    lines = ["# fastdl GPU check", ""]
    if report.dry_run:
        lines += ["**Dry run**: stand-in commands, no device; the numbers below are not measurements.", ""]
    lines += [f"- {name}: {value}" for name, value in report.environment]
    lines += ["", "| stage | status | seconds | limit s | notes |", "|---|---|---|---|---|"]
    for s in report.stages.values():
        lines.append(f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.limit:.0f} | {cell('; '.join(s.notes))} |")
    if report.build_errors:
        lines += ["", "## Build errors", "", "```", *report.build_errors, "```"]
    if report.failures:
        lines += ["", "## Failures", ""]
        for test_id, kind, first in report.failures[:FAILURES_LISTED]:
            lines.append(f"- `{test_id}` ({kind}): {cell(' / '.join(first))}")
        if len(report.failures) > FAILURES_LISTED:
            lines.append(f"- ... and {len(report.failures) - FAILURES_LISTED} more (junit.xml, tests.log)")
    if report.benchmarks:
        lines += [
            "",
            "## Benchmarks",
            "",
            "ratio = baseline median / fastdl median (above 1: fastdl is faster).",
            "",
            "| op | case | baseline | baseline ms | fastdl ms | ratio | fastdl TFLOP/s | baseline TFLOP/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report.benchmarks:
            tf = ["" if v is None else f"{v:.1f}" for v in (r["fastdl_tflops"], r["baseline_tflops"])]
            lines.append(
                f"| {r['op']} | {r['case']} | {r['baseline']} | {r['baseline_ms']:.3f} | {r['fastdl_ms']:.3f} "
                f"| {r['ratio']:.2f}x | {tf[0]} | {tf[1]} |"
            )
    lines += ["", f"Result: {'PASS' if report.passed() else 'FAIL'}", ""]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check-results", help="directory for summary.md, the logs and the results")
    parser.add_argument("--skip-build", action="store_true", help="use the fastdl that is already installed")
    parser.add_argument("--cuda-arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (default: 90, Hopper)")
    parser.add_argument(
        "--build-timeout", type=float, default=240, metavar="S", help="build limit (default: %(default)g s)"
    )
    parser.add_argument(
        "--test-timeout", type=float, default=180, metavar="S", help="tests limit (default: %(default)g s)"
    )
    parser.add_argument(
        "--sanitizer-timeout",
        type=float,
        default=90,
        metavar="S",
        help="compute-sanitizer limit, out of the time the build and tests left unused (default: %(default)g s)",
    )
    parser.add_argument(
        "--bench-timeout", type=float, default=150, metavar="S", help="benchmarks limit (default: %(default)g s)"
    )
    parser.add_argument(
        "--per-test-timeout",
        type=float,
        default=60,
        metavar="S",
        help="a test running longer fails; at twice this its pytest process is ended (default: %(default)g s)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="stand-in commands instead of the device work (no GPU needed)"
    )
    parser.add_argument("--dry-run-hang", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run_hang and not args.dry_run:
        parser.error("--dry-run-hang needs --dry-run")
    return args


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    args.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM from whatever runs this: unwind like Ctrl-C, so the stages are killed and summary.md written
    signal.signal(signal.SIGTERM, interrupt)
    report = Report(dry_run=args.dry_run)
    budget = Budget(args.build_timeout + args.test_timeout + args.bench_timeout)
    try:
        report.environment = probe_environment(args.dry_run)
        if build(args, report, budget.allow(args.build_timeout, args.test_timeout + args.bench_timeout)):
            tests(args, report, budget.allow(args.test_timeout, args.bench_timeout))
            sanitizer(args, report, budget.allow(args.sanitizer_timeout, args.bench_timeout))
            benchmarks(args, report, budget.allow(args.bench_timeout, 0))
    except KeyboardInterrupt:
        report.environment.append(("interrupted", "the check was stopped before it finished"))
    finally:
        text = render(report)
        (out / "summary.md").write_text(text)
        print("\n" + text, flush=True)
    return 0 if report.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
