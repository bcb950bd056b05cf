"""Options and fixtures shared by every benchmark module.

Each benchmark records (``_common.record``) the op, the named case, the implementation (``fastdl``
or a baseline such as ``eager``) and the max abs error against the reference, so that
``fastdl bench`` can pair every baseline with fastdl on the same case.
"""

from __future__ import annotations

import ctypes

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastdl")
    group.addoption("--quick", action="store_true", help="only the quick cases")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark on")
    group.addoption("--threads", type=int, default=0, help="torch threads for both sides (0: all cores)")
    group.addoption(
        "--keep-freed-memory", action="store_true", help="pin glibc's allocator thresholds (see keep_freed_memory)"
    )


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks instead of returning them to the OS.

    By default a block of a few MB or more is mmapped, and freeing it, or trimming the heap
    above it, hands its pages back, so the next call's output of the same size is page-faulted
    afresh. Whether that happens depends on the process's allocation history, so the same
    25 MB convolution measured 6.7 ms or 21 ms from one run to the next (the page faults cost
    more than the arithmetic). Pinning the thresholds times the kernels without that lottery,
    for both sides alike. It is an option (``--keep-freed-memory``), not the default, because the
    default is what users run, and its effect on the other ops is not settled yet. No-op where
    the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from <malloc.h>
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed mmap threshold
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a case that `fastdl bench --quick` runs")
    threads = config.getoption("--threads") or torch.get_num_threads()
    torch.set_num_threads(threads)  # the same for fastdl and every baseline
    if config.getoption("--keep-freed-memory"):
        keep_freed_memory()


@pytest.fixture
def device(request) -> str:
    dev = request.config.getoption("--device")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


def pytest_collection_modifyitems(config, items):
    """Drop cases not marked quick when --quick is given."""
    if not config.getoption("--quick"):
        return
    kept = [item for item in items if item.get_closest_marker("quick")]
    config.hook.pytest_deselected(items=[i for i in items if i not in kept])
    items[:] = kept
