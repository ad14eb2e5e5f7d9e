"""`make chaos`'s monitor: two copies count when two samples in a row see them."""

from __future__ import annotations

import threading

from deploy.chaos import Monitor


class Scripted(Monitor):
    """A monitor whose samples are given, not read from /proc."""

    def __init__(self, samples: list[list[str]]) -> None:
        super().__init__("lab", ("h1", "h2"))
        self.script = iter(samples)

    def running_on(self) -> list[str]:
        try:
            return next(self.script)
        except StopIteration:
            self.stop.set()
            return ["h2"]

    def pids(self, host: str) -> list[str]:
        return []


def watch(samples: list[list[str]]) -> Scripted:
    monitor = Scripted(samples)
    thread = threading.Thread(target=monitor.run)
    thread.start()
    thread.join(5)
    return monitor


def test_one_sample_with_two_copies_is_a_glimpse_not_a_double_run() -> None:
    monitor = watch([["h1"], ["h1", "h2"], ["h2"], ["h2"]])
    assert monitor.twice == 0
    assert len(monitor.glimpses) == 1


def test_two_samples_in_a_row_are_a_double_run() -> None:
    monitor = watch([["h1"], ["h1", "h2"], ["h1", "h2"], ["h2"]])
    assert monitor.twice == 1


def test_glimpses_apart_are_not_added_up() -> None:
    monitor = watch([["h1", "h2"], ["h2"], ["h1", "h2"], ["h2"]])
    assert monitor.twice == 0
    assert len(monitor.glimpses) == 2
