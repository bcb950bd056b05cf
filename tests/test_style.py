"""The tree keeps its style: ruff's checks as configured in pyproject.toml (pyflakes: unused imports
and variables, undefined names), ruff's formatter on the Python files, and clang-format
(.clang-format) on the C++ and CUDA sources. ruff and clang-format come with the [test] extra; a
check is skipped where its tool is not installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TREES = ["python", "tests", "benchmarks", "kernels"]


def tool(name: str) -> str:
    """The executable ``name`` beside this interpreter (a venv's bin/, used without activating it)
    or on PATH; skips the test where it is missing."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return found


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = run(tool("ruff"), "check", "--no-cache", *PYTHON_TREES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_is_formatted():
    result = run(tool("ruff"), "format", "--check", "--no-cache", *PYTHON_TREES)
    assert result.returncode == 0, (
        "run `ruff format python tests benchmarks kernels`:\n" + result.stdout + result.stderr
    )


def test_cpp_and_cuda_are_formatted():
    sources = run("git", "ls-files", "csrc/*.c", "csrc/*.cpp", "csrc/*.h", "csrc/*.cu", "csrc/*.cuh").stdout.split()
    if not sources:
        pytest.skip("not a git checkout: the sources to check are git's tracked files")
    result = run(tool("clang-format"), "--dry-run", "--Werror", *sources)
    assert result.returncode == 0, "run clang-format -i on these files:\n" + result.stderr[-4000:]
