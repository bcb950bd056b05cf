"""A per-test time limit for plain pytest, for images without pytest-timeout.

    python -m pytest -p benchmarks.per_test_timeout --per-test-timeout=60 ...

A test still running after the limit fails with ``PerTestTimeout``, raised by SIGALRM in the main
thread, and the session goes on with the next test. A test stuck in native code (a CUDA call that
never returns) never gets back to Python for that exception to be raised, so at twice the limit
faulthandler prints every thread's stack and ends the process; the caller's stage timeout and log
cover what that process did not report.
"""

from __future__ import annotations

import faulthandler
import os
import signal

import pytest

# pytest redirects fd 2 while tests run, and a stack dump written there would vanish with the
# process. A `-p` plugin is imported before capturing starts, so this is still the real stderr.
_STDERR_FD = os.dup(2)


class PerTestTimeout(Exception):
    """A test ran longer than --per-test-timeout."""


def pytest_addoption(parser):
    parser.addoption(
        "--per-test-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fail a test that runs longer than SECONDS; end the process at twice that (0: no limit)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    seconds = item.config.getoption("per_test_timeout")
    if seconds > 0:
        faulthandler.dump_traceback_later(2 * seconds, exit=True, file=_STDERR_FD)
    yield
    if seconds > 0:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = item.config.getoption("per_test_timeout")
    if seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise PerTestTimeout(f"{item.nodeid} ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
