import os

# Triton kernels run in the interpreter on CPU-only machines. It is chosen when a kernel is
# decorated, so it must be set before anything imports fastdl.kernels.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastdl.backends.cpu  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--seed",
        default="0",
        help="base of the per-test seeds of harness.fresh_seed (each test's seed also depends on its id)",
    )


def pytest_configure(config):
    os.environ["FASTDL_TEST_SEED"] = str(config.getoption("--seed"))


@pytest.fixture(params=fastdl.backends.cpu.supported_cpu_capabilities())
def every_cpu_capability(request):
    """Runs the test once per CPU capability this machine supports (default, avx2, avx512), with
    the C++ kernels restricted to it. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("every_cpu_capability")``."""
    with fastdl.backends.cpu.cpu_capability(request.param):
        yield request.param


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests and its module-scoped fixtures (results computed in
    one and compared in the other must use the same thread count): for tiny models, where on a
    busy 2-core machine OpenMP threads that wait for each other cost more than they gain."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
