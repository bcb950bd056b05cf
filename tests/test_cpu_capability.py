"""The CPU capability switch (fastdl.backends.cpu, FASTDL_CPU_CAPABILITY)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastdl.backends.cpu as backend_cpu

SUPPORTED = backend_cpu.supported_cpu_capabilities()
# Under an emulated CPU (.ci/emulated-cpus) a child process must run in the same emulator.
LAUNCHER = os.environ.get("FASTDL_TEST_LAUNCHER", "").split()


def run_python(code: str, capability: str | None) -> subprocess.CompletedProcess:
    """A fresh interpreter importing fastdl, with FASTDL_CPU_CAPABILITY set or unset."""
    env = {k: v for k, v in os.environ.items() if k != "FASTDL_CPU_CAPABILITY"}
    if capability is not None:
        env["FASTDL_CPU_CAPABILITY"] = capability
    return subprocess.run([*LAUNCHER, sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_supported_is_a_prefix_of_the_order():
    assert SUPPORTED == list(backend_cpu.CAPABILITIES[: len(SUPPORTED)])


@pytest.mark.parametrize("name", SUPPORTED)
def test_set_and_restore(name):
    before = backend_cpu.get_cpu_capability()
    with backend_cpu.cpu_capability(name):
        assert backend_cpu.get_cpu_capability() == name
    assert backend_cpu.get_cpu_capability() == before


def test_restored_after_an_error():
    before = backend_cpu.get_cpu_capability()
    with pytest.raises(RuntimeError, match="inside"):
        with backend_cpu.cpu_capability("default"):
            raise RuntimeError("inside")
    assert backend_cpu.get_cpu_capability() == before


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="must be one of default, avx2, avx512; got 'sse9'"):
        backend_cpu.set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="must be a str, got int"):
        backend_cpu.set_cpu_capability(2)


@pytest.mark.skipif(SUPPORTED[-1] == "avx512", reason="this CPU supports every capability")
def test_above_the_cpu_is_refused():
    unsupported = backend_cpu.CAPABILITIES[len(SUPPORTED)]
    with pytest.raises(ValueError, match=f"cannot use CPU capability {unsupported}: this CPU supports at most"):
        backend_cpu.set_cpu_capability(unsupported)
    result = run_python("import fastdl.backends.cpu as c; print(c.get_cpu_capability())", unsupported)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SUPPORTED[-1]
    assert f"FASTDL_CPU_CAPABILITY={unsupported} but this CPU supports at most {SUPPORTED[-1]}" in result.stderr


def test_environment_variable_lowers_the_start():
    result = run_python("import fastdl.backends.cpu as c; print(c.get_cpu_capability())", "default")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "default"
    result = run_python("import fastdl.backends.cpu as c; print(c.get_cpu_capability())", None)
    assert result.stdout.strip() == SUPPORTED[-1]


def test_bad_environment_variable_fails_the_import():
    result = run_python("import fastdl.ops", "avx1024")
    assert result.returncode != 0
    assert "FASTDL_CPU_CAPABILITY must be one of default, avx2, avx512; got 'avx1024'" in result.stderr
