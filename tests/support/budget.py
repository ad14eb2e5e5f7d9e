"""Every test has a time budget: a hang becomes a failure with every thread's traceback,
not a CI run that ends at its deadline with nothing to read.

The budget covers a test's setup, call and teardown (so a module's lab, made in its first
test's setup and removed in its last test's teardown, counts once each). It is a ceiling for
hangs, never a speed target: speed lives in `make bench`.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest

# Generous ceilings per test directory; a test that needs more says so with
# @pytest.mark.budget(seconds).
BUDGET_S = {"unit": 120.0, "middle": 300.0, "lab": 900.0}
DEFAULT_BUDGET_S = 300.0


class OverBudget(Exception):
    """A test ran past its budget: something waited for what never came."""


def budget_of(item: pytest.Item) -> float:
    marker = item.get_closest_marker("budget")
    if marker is not None:
        return float(marker.args[0])
    parts = item.path.parts
    for directory, seconds in BUDGET_S.items():
        if directory in parts:
            return seconds
    return DEFAULT_BUDGET_S


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    seconds = budget_of(item)

    def over(signum: int, frame: FrameType | None) -> None:
        said = f"\n{item.nodeid}: over its budget of {seconds:.0f} s; every thread:"
        print(said, file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise OverBudget(f"{item.nodeid} ran over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, over)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
