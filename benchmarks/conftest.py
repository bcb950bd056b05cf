"""Options and fixtures shared by every benchmark module.

Each benchmark records (``_common.record``) the op, the named case, the implementation (``fastdl``
or a baseline such as ``eager``) and the max abs error against the reference, so that
``fastdl bench`` can pair every baseline with fastdl on the same case.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("fastdl")
    group.addoption("--quick", action="store_true", help="only the quick cases")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark on")
    group.addoption("--threads", type=int, default=0, help="torch threads for both sides (0: all cores)")


def pytest_configure(config):
    config.addinivalue_line("markers", "quick: a case that `fastdl bench --quick` runs")
    threads = config.getoption("--threads") or torch.get_num_threads()
    torch.set_num_threads(threads)  # the same for fastdl and every baseline


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
