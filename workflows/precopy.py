"""Iterative pre-copy, decided from CRIU's own statistics (pure, no I/O).

Each pre-dump sends the pages dirtied since the previous one while the container keeps
running. After each, `decide` applies QEMU's rule: take the final (frozen) dump once the
pages still dirty can be sent within the downtime budget at the measured bandwidth. Two
limits stop a migration that will never get there: an iteration cap, and a minimum shrink
of the dirty set per iteration (a writer faster than the link never converges).

Estimates, written down: "still dirty" is the latest iteration's dirty set (the pages the
workload dirtied while the previous one was sent; the next one is smaller if it converges,
so this errs towards iterating once more). The bandwidth is the latest iteration's bytes
over its send time. When both come from the same iteration the rule reads "the last
iteration took no longer to send than the budget".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

PAGE_SIZE = 4096  # CRIU counts pages of the host's size; 4 KiB on x86-64
MIB = 2**20
# Past eight iterations a dirty set that still has not fit the budget rarely will (P.Haul's cap).
DEFAULT_MAX_ITERATIONS = 8
# An iteration that shrinks the dirty set by less than this is not worth its freeze.
DEFAULT_MIN_SHRINK_PERCENT = 10

Action = Literal["continue", "final"]
Rule = Literal["first", "converged", "iteration_cap", "not_converging", "continue"]

_STATS_KEYS = (
    "pages_scanned",
    "pages_written",
    "freezing_time",
    "frozen_time",
    "memdump_time",
    "memwrite_time",
)


class StatsMissing(ValueError):
    """CRIU's statistics lack a field: deciding without it could freeze far past the budget."""


@dataclass(frozen=True)
class IterationStats:
    """What one pre-dump (or dump) cost, as CRIU counted it: pages, and microseconds."""

    pages_scanned: int
    pages_written: int  # the dirty set this iteration sent
    freezing_us: int
    frozen_us: int
    memdump_us: int  # draining pages while frozen; in a full dump it includes the sending
    memwrite_us: int  # sending pages to the page server (after the thaw, for a pre-dump)

    @classmethod
    def from_criu(cls, stats: Mapping[str, object]) -> IterationStats:
        """From a `stats-dump` entry as `pycriu.images.load` (or `criu.load_stats`) gives it."""
        values: dict[str, int] = {}
        for key in _STATS_KEYS:
            value = stats.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StatsMissing(f"CRIU stats-dump has no usable {key!r} (got {value!r})")
            values[key] = value
        return cls(
            pages_scanned=values["pages_scanned"],
            pages_written=values["pages_written"],
            freezing_us=values["freezing_time"],
            frozen_us=values["frozen_time"],
            memdump_us=values["memdump_time"],
            memwrite_us=values["memwrite_time"],
        )

    @property
    def dirty_bytes(self) -> int:
        return self.pages_written * PAGE_SIZE

    @property
    def send_seconds(self) -> float:
        return self.memwrite_us / 1e6

    @property
    def measurable(self) -> bool:
        """Sent something and took measurable time: a bandwidth sample."""
        return self.pages_written > 0 and self.memwrite_us > 0


@dataclass(frozen=True)
class PrecopyPlan:
    """The request's downtime budget and the limits that stop iterating."""

    downtime_budget_ms: int
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    min_shrink_percent: int = DEFAULT_MIN_SHRINK_PERCENT

    def __post_init__(self) -> None:
        if self.downtime_budget_ms <= 0:
            raise ValueError("the downtime budget must be positive")
        if self.max_iterations < 1:
            raise ValueError("at least one pre-dump iteration is needed")
        if not 0 <= self.min_shrink_percent < 100:
            raise ValueError("the minimum shrink is a percentage in [0, 100)")


@dataclass(frozen=True)
class PrecopyDecision:
    """Iterate once more, or take the final dump now; and why, in words for the trace."""

    action: Action
    rule: Rule
    reason: str
    iterations: int
    remaining_bytes: int | None
    bandwidth_bps: float | None
    # Source freeze expected for the final dump: the latest pre-dump's frozen time plus sending
    # the remaining bytes at the measured bandwidth. The restore comes on top.
    expected_downtime_ms: float | None

    @property
    def final(self) -> bool:
        return self.action == "final"


def bandwidth_sample(history: Sequence[IterationStats]) -> IterationStats | None:
    """The latest iteration that measured the link; None before any did."""
    return next((it for it in reversed(history) if it.measurable), None)


def decide(history: Sequence[IterationStats], plan: PrecopyPlan) -> PrecopyDecision:
    """After each pre-dump: continue, or switch to the final dump (QEMU's rule, with limits)."""
    if not history:
        return PrecopyDecision(
            action="continue",
            rule="first",
            reason="no pre-dump yet: the first one copies all memory while the container runs",
            iterations=0,
            remaining_bytes=None,
            bandwidth_bps=None,
            expected_downtime_ms=None,
        )
    latest = history[-1]
    remaining = latest.dirty_bytes
    sample = bandwidth_sample(history)
    budget_us = plan.downtime_budget_ms * 1000
    bandwidth: float | None = None
    expected: float | None = None
    if sample is not None:
        bandwidth = sample.dirty_bytes / sample.send_seconds
        send_ms = remaining * sample.memwrite_us / sample.dirty_bytes / 1000
        expected = round(latest.frozen_us / 1000 + send_ms, 1)
    measured = PrecopyDecision(
        action="continue",
        rule="continue",
        reason="",
        iterations=len(history),
        remaining_bytes=remaining,
        bandwidth_bps=bandwidth,
        expected_downtime_ms=expected,
    )

    def final(rule: Rule, reason: str) -> PrecopyDecision:
        return replace(measured, action="final", rule=rule, reason=reason)

    if remaining == 0:
        return final("converged", "converged: nothing left dirty")
    # remaining ≤ (bytes / send_us) × budget_us, in integers so the edge is exact.
    if sample is not None and remaining * sample.memwrite_us <= sample.dirty_bytes * budget_us:
        fits = f"{_mib(remaining)} dirty ≤ {_rate(bandwidth)} × {plan.downtime_budget_ms} ms"
        return final("converged", f"converged: {fits}")
    why_not = (
        f"{_mib(remaining)} dirty > {_rate(bandwidth)} × {plan.downtime_budget_ms} ms"
        if sample is not None
        else "bandwidth not measured yet (no iteration recorded send time)"
    )
    if len(history) >= plan.max_iterations:
        return final("iteration_cap", f"iteration cap {plan.max_iterations} reached; {why_not}")
    if len(history) >= 2:
        before = history[-2].dirty_bytes
        # Progress means latest ≤ before × (1 − min_shrink), again in integers.
        if remaining * 100 > before * (100 - plan.min_shrink_percent):
            return final(
                "not_converging",
                f"not converging: dirty set {_change(before, remaining)}"
                f" ({_mib(before)} → {_mib(remaining)}; needs {plan.min_shrink_percent}%);"
                f" {why_not}",
            )
    return replace(measured, reason=f"continue: {why_not}")


def _number(value: float) -> str:
    """One decimal, rounded down: 9.99% must not read as the 10% it failed to reach."""
    return f"{math.floor(value * 10) / 10:.1f}".removesuffix(".0")


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


def _rate(bps: float | None) -> str:
    if bps is None:
        return "? MiB/s"
    per_s = bps / MIB
    return f"{per_s:.0f} MiB/s" if per_s >= 10 else f"{per_s:.1f} MiB/s"


def _change(before: int, after: int) -> str:
    if before == 0:
        return "grew from nothing"
    percent = (before - after) * 100 / before
    if percent < 0:
        return f"grew {_number(-percent)}%"
    return f"shrank only {_number(percent)}%"
