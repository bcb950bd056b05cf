"""Packaging and command-line checks: what the wheel contains and what `fastdl` prints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdl
import fastdl.backends.cpu
import fastdl.ops
from fastdl import bench
from fastdl.ops import _library


def test_op_library_is_abi3_and_free_of_libtorch_python():
    lib = Path(fastdl._C.__file__)
    assert lib.name == "_C.abi3.so"
    elftools = pytest.importorskip("shutil").which("readelf")
    if elftools is None:
        pytest.skip("readelf not installed")
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in needed and "libpython" not in needed
    assert "libtorch" in needed or "libc10" in needed


def test_triton_kernels_and_benchmarks_ship_in_the_package():
    import fastdl.benchmarks
    import fastdl.kernels

    # a namespace package (see the test below): it has a path, no __file__
    assert [Path(p).name for p in fastdl.kernels.__path__] == ["kernels"]
    assert (Path(next(iter(fastdl.kernels.__path__))) / "layer_norm.py").exists()
    assert (bench.benchmark_dir() / "bench_roi_align.py").exists()


def schema_names() -> list[str]:
    """Every operator the fastdl:: library defined, read from the dispatcher."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdl::"))


def test_every_op_has_schema_kernels_composite_and_fake():
    names = schema_names()
    assert "roi_align" in names and "_conv2d_backward" in names
    assert set(names) == set(_library.public_ops()), "an operator schema without a composite, or the reverse"
    for name in names:
        qualname = _library.qualname(name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), f"{name}: no CPU kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd"), (
            f"{name}: no composite"
        )
        assert _library.implementation(name, "cpu") == "C++"
        entry = torch._library.simple_registry.singleton.find(qualname)
        assert entry.fake_impl.kernel is not None, f"{name}: no fake kernel"


def test_every_public_op_has_a_docs_page():
    """Each public schema is named on a page of docs/ops/, as fastdl.ops.<op> or torch.ops.fastdl.<op>."""
    pages = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "docs" / "ops").glob("*.md"))
    for name in schema_names():
        if not name.startswith("_"):
            assert re.search(rf"(fastdl\.ops|torch\.ops\.fastdl)\.{name}\b", pages), f"{name}: no docs/ops page"


def test_info_command_lists_every_op():
    out = subprocess.run([sys.executable, "-m", "fastdl", "info"], capture_output=True, text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out
    assert "CUDA kernels built:" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["op", "CPU", "CUDA", "MPS"])
    end = lines.index("", header)
    served = {line.split()[0]: line.split()[1] for line in lines[header + 1 : end]}
    for name in schema_names():
        assert served.get(name) == "C++", out
    capability = fastdl.backends.cpu.get_cpu_capability()
    assert f"CPU path of each op at {capability} (float32):" in out
    for name, path in fastdl.backends.cpu.kernel_paths().items():
        assert f"{name}  " in out and path in out


def test_kernel_paths_cover_every_public_op_at_every_capability():
    public = {name for name in schema_names() if not name.startswith("_")}
    for capability in fastdl.backends.cpu.CAPABILITIES:
        paths = fastdl.backends.cpu.kernel_paths(capability)
        assert set(paths) == public
        tiled = [name for name, path in paths.items() if "tiles" in path]
        assert tiled == ([] if capability == "default" else ["attention", "conv2d", "linear"])
    with pytest.raises(ValueError, match="capability must be one of"):
        fastdl.backends.cpu.kernel_paths("sse4")


def test_bench_summary_pairs_each_baseline_with_fastdl(tmp_path):
    def entry(impl, case, median, err=0.0, peak=None):
        return {
            "stats": {"median": median},
            "extra_info": {"op": "nms", "case": case, "impl": impl, "max_abs_err": err, "peak_mb": peak},
        }

    data = {
        "benchmarks": [
            entry("eager", "a", 2.0),
            entry("fastdl", "a", 0.5, 1e-6, 3.0),
            entry("python-loop", "a", 8.0, peak=12.0),
            entry("fastdl", "b", 1.0),
            entry("eager", "b", 0.5),
        ]
    }
    rows = bench.summarise(data)
    assert [(r["case"], r["baseline"], r["speedup"]) for r in rows] == [
        ("a", "eager", 4.0),
        ("a", "python-loop", 16.0),
        ("b", "eager", 0.5),
    ]
    table = bench.format_table(rows)
    assert "4.00x" in table and "16.00x" in table and "0.50x" in table and "12 / 3" in table
    pytest.importorskip("matplotlib")
    assert bench.plot(rows, tmp_path / "chart.png") and (tmp_path / "chart.png").stat().st_size > 0


def test_bench_command_end_to_end(tmp_path):
    """`fastdl bench --quick --ops nms` runs the benchmark module and writes JSON and a table."""
    out = subprocess.run(
        [sys.executable, "-m", "fastdl", "bench", "--quick", "--ops", "nms", "--out", str(tmp_path), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "bench-cpu.json").read_text())
    impls = {b["extra_info"]["impl"] for b in data["benchmarks"]}
    assert {"fastdl", "eager", "python-loop"} <= impls
    assert "speedup" in out.stdout and "python-loop" in out.stdout


def test_torch_version_guard():
    from fastdl import _build_info, _loader

    assert _loader._release("2.13.0+cpu") == ("2", "13") == _loader._release("2.13.1")
    assert _loader._release(_build_info.TORCH_VERSION) == _loader._release(torch.__version__)
    hint = _loader._rebuild_hint()
    assert _build_info.TORCH_VERSION in hint and "--no-build-isolation" in hint


def test_the_triton_kernels_folder_does_not_shadow_a_kernels_package(monkeypatch):
    """``kernels/`` is ``fastdl.kernels`` in the wheel. Run from the repository root (``python -m
    pytest``, a script there), it is also on ``sys.path`` as a top-level ``kernels``: with an
    ``__init__.py`` it would hide Hugging Face's ``kernels`` package, which transformers imports."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or not Path(spec.origin).is_relative_to(root / "kernels"), spec.origin
