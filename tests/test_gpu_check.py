"""benchmarks/gpu_check.py on the CPU: its --dry-run pipeline (stage limits, killing a hung stage,
summary.md), its JUnit and benchmark-JSON readers, and the per-test timeout plugin it gives pytest."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("build", "tests", "sanitizer", "benchmarks")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def run_check(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    return done, time.monotonic() - start


def stage_rows(summary: str) -> dict[str, dict[str, str]]:
    """The stage table of summary.md, by stage name."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = dict(zip(("status", "seconds", "limit", "notes"), cells[1:]))
    return rows


def test_dry_run_writes_summary_logs_and_results(tmp_path):
    done, _ = run_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    rows = stage_rows(summary)
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(STAGES, "ok")
    assert rows["tests"]["notes"].startswith(f"{len(list((tmp_path / 'tests').glob('*.xml')))} passed, 0 failed")
    assert "- GPU: not probed (dry run)" in summary and "- CPU: " in summary
    assert "| nms | random-1k | eager | 40.000 | 0.500 | 80.00x |" in summary
    assert summary.rstrip().endswith("Result: PASS")
    assert done.stdout.rstrip().endswith("Result: PASS")  # the summary is printed last
    for log in ("build.log", "tests.log", "sanitizer.log", "bench.log"):
        assert "dry run, pid" in (tmp_path / log).read_text(), log
    assert "pip install --no-build-isolation --no-deps -v ." in (tmp_path / "build.log").read_text()
    assert "--device cuda --quick" in (tmp_path / "bench.log").read_text()
    assert json.loads((tmp_path / "bench-cuda.json").read_text())["benchmarks"]
    assert "tests/test_nms.py" in (tmp_path / "junit.xml").read_text()


def test_a_hung_stage_is_killed_at_its_limit_and_later_stages_still_run(tmp_path):
    done, seconds = run_check(tmp_path, "--dry-run-hang", "tests", "--test-timeout", "2")
    assert done.returncode == 1
    rows = stage_rows((tmp_path / "summary.md").read_text())
    assert rows["tests"]["status"] == "timed out"
    assert 1.9 <= float(rows["tests"]["seconds"]) <= 3.0
    assert rows["sanitizer"]["status"] == "ok" and rows["benchmarks"]["status"] == "ok"
    assert seconds < 15
    # the stand-ins ignored SIGINT, as a process stuck in a CUDA call would; all were killed
    pids = [int(re.search(r"dry run, pid (\d+)", log.read_text())[1]) for log in (tmp_path / "tests").glob("*.log")]
    assert pids and not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert "stopped at the stage limit of 2 s" in (tmp_path / "tests.log").read_text()


def test_a_hung_build_stops_the_check(tmp_path):
    done, _ = run_check(tmp_path, "--dry-run-hang", "build", "--build-timeout", "0.5")
    rows = stage_rows((tmp_path / "summary.md").read_text())
    assert done.returncode == 1
    assert rows["build"]["status"] == "timed out"
    assert [rows[s]["status"] for s in ("tests", "sanitizer", "benchmarks")] == ["not run"] * 3


def test_stage_limits_leave_time_for_the_stages_after(gpu_check):
    budget = gpu_check.Budget(100)
    assert 49 <= budget.allow(240, 50) <= 50
    assert budget.allow(30, 50) == 30
    assert budget.allow(30, 200) == 0


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4">
<testcase classname="tests.test_nms" name="test_cuda_matches_cpu[65]" time="0.1"/>
<testcase classname="tests.test_nms" name="test_cuda_matches_cpu[5000]" time="0.2">
<failure message="AssertionError: assert False">def test_cuda_matches_cpu(n):
&gt;       assert torch.equal(a, b)
E       AssertionError: assert False
E        +  where False = equal(tensor([0, 1]), tensor([1, 0]))
E       third line
E       fourth line

tests/test_nms.py:155: AssertionError</failure></testcase>
<testcase classname="tests.test_lstm" name="test_cuda_cell_half" time="0.0">
<error message="failed on setup with &quot;RuntimeError: CUDA error: out of memory&#10;second line&quot;">
traceback</error></testcase>
<testcase classname="tests.test_roi_pool" name="test_cuda_deterministic_backward" time="0.0">
<skipped type="pytest.skip" message="needs a CUDA device">skipped</skipped></testcase>
<testcase time="0.000" />
</testsuite></testsuites>
"""


def test_parse_junit_counts_outcomes_and_keeps_the_first_lines_of_each_failure(gpu_check, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    counts, failures = gpu_check.parse_junit(path)
    assert counts == dict(passed=1, failed=1, skipped=1, errors=1)  # the nameless placeholder is not a test
    assert failures == [
        (
            "tests.test_nms::test_cuda_matches_cpu[5000]",
            "failure",
            ["AssertionError: assert False", "+  where False = equal(tensor([0, 1]), tensor([1, 0]))", "third line"],
        ),
        (
            "tests.test_lstm::test_cuda_cell_half",
            "error",
            ['failed on setup with "RuntimeError: CUDA error: out of memory', 'second line"'],
        ),
    ]


def bench_entry(op, case, impl, median, **extra):
    """One benchmark as pytest-benchmark writes it, with what benchmarks/_common.record adds."""
    info = dict(op=op, case=case, impl=impl, max_abs_err=1e-6, threads=16, **extra)
    return {
        "group": None,
        "name": f"test_{op}[{case}-{impl}]",
        "fullname": f"benchmarks/bench_{op}.py::test_{op}",
        "params": {"case": case, "impl": impl},
        "param": f"{case}-{impl}",
        "extra_info": info,
        "options": {},
        "stats": {
            "min": median * 0.9,
            "max": median * 1.2,
            "mean": median,
            "median": median,
            "rounds": 5,
            "iterations": 1,
        },
    }


def test_summarise_benchmarks_pairs_each_baseline_with_fastdl(gpu_check):
    flops = 4 * 16 * 16 * 1024 * 1024 * 64  # attention forward, B16 H16 N1k D64
    data = {
        "machine_info": {},
        "benchmarks": [
            bench_entry("nms", "random-1k", "python-loop", 0.080),
            bench_entry("nms", "random-1k", "fastdl", 0.0005),
            bench_entry("nms", "random-1k", "eager", 0.040),
            bench_entry("attention", "cuda N1k-D64 fp16 forward", "fastdl", 0.0002, flops=flops),
            bench_entry("attention", "cuda N1k-D64 fp16 forward", "sdpa", 0.0001, flops=flops),
            bench_entry("roi_align", "small-64ch forward", "eager", 0.003),  # fastdl failed: no pair
            {"name": "test_unrecorded", "extra_info": {}, "stats": {"median": 1.0}},
        ],
    }
    rows = gpu_check.summarise_benchmarks(data)
    assert [(r["op"], r["case"], r["baseline"]) for r in rows] == [
        ("attention", "cuda N1k-D64 fp16 forward", "sdpa"),
        ("nms", "random-1k", "eager"),
        ("nms", "random-1k", "python-loop"),
    ]
    attention, eager, loop = rows
    assert attention["ratio"] == pytest.approx(0.5)
    assert attention["fastdl_tflops"] == pytest.approx(flops / 0.0002 / 1e12)
    assert attention["baseline_tflops"] == pytest.approx(2 * attention["fastdl_tflops"])
    assert (eager["ratio"], loop["ratio"]) == (pytest.approx(80), pytest.approx(160))
    assert (eager["baseline_ms"], eager["fastdl_ms"]) == (pytest.approx(40), pytest.approx(0.5))
    assert eager["fastdl_tflops"] is None


SLOW_TESTS = """
import signal, time

def test_sleeps():
    time.sleep(30)

def test_after():
    pass

def test_stuck_where_no_signal_gets_through():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(30)
"""


def run_with_timeout_plugin(tmp_path, *args) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "test_slow.py").write_text(SLOW_TESTS)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "benchmarks.per_test_timeout",
            "--per-test-timeout=0.5",
            "-v",
            f"--junitxml={tmp_path / 'junit.xml'}",
            "test_slow.py",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    return done, time.monotonic() - start


def test_per_test_timeout_fails_the_slow_test_and_goes_on(gpu_check, tmp_path):
    done, seconds = run_with_timeout_plugin(tmp_path, "-k", "not stuck")
    assert done.returncode == 1 and seconds < 20
    counts, failures = gpu_check.parse_junit(tmp_path / "junit.xml")
    assert counts == dict(passed=1, failed=1, skipped=0, errors=0)
    [(test_id, kind, lines)] = failures
    assert test_id.endswith("::test_sleeps") and kind == "failure"
    assert "PerTestTimeout: test_slow.py::test_sleeps ran longer than 0.5 s" in lines[0]


def test_per_test_timeout_ends_a_process_stuck_past_twice_the_limit(tmp_path):
    done, seconds = run_with_timeout_plugin(tmp_path, "-k", "stuck")
    assert done.returncode != 0 and seconds < 20
    assert "Timeout (0:00:01)!" in done.stderr and "test_stuck_where_no_signal_gets_through" in done.stderr
