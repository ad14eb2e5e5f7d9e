"""The bench's arithmetic, pure: medians and spreads of samples, and the freeze of one
migration record cut into the steps and hops that ran inside it.

The freeze is the first frozen instant (the dump step's `frozen_at`) until the destination's
network opened: `opened_at` in the open_network step's result when the runtime records it,
else that step's end in the record. Both are epoch seconds; in the lab every host reads the
same clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The forward steps whose time can fall inside the freeze, with their names in tables.
SLICE_LABELS = {
    "dump": "dump",
    "transfer": "transfer",
    "restore": "restore",
    "verify": "verify",
    "commit": "commit",
    "open_network": "cut-over",
}
HOP = "hop "  # a slice between two steps: "hop dump>transfer"


@dataclass(frozen=True)
class Spread:
    """The median of some samples, and the smallest and largest of them."""

    median: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}

    def text(self, spec: str = ".0f") -> str:
        """`1493` for one sample, `1493 (1401-1610)` for several."""
        if self.n == 1 or self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"


def spread(values: Iterable[float | None]) -> Spread | None:
    """Over the known values; None when there is none."""
    known = [float(v) for v in values if v is not None]
    if not known:
        return None
    return Spread(round(statistics.median(known), 1), min(known), max(known), len(known))


def spread_text(value: Spread | None, spec: str = ".0f") -> str:
    return "-" if value is None else value.text(spec)


@dataclass(frozen=True)
class FreezeWindow:
    """From the first frozen instant to the destination's open network (epoch seconds)."""

    frozen_at: float
    opened_at: float
    opened_from: str  # where opened_at came from

    @property
    def ms(self) -> float:
        return round((self.opened_at - self.frozen_at) * 1000, 1)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _done_forward(steps: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    found = [
        s for s in steps
        if s.get("name") == name and s.get("kind", "forward") == "forward"
        and s.get("status") == "done"
    ]  # fmt: skip
    return found[-1] if found else None


def freeze_window(record: Mapping[str, Any]) -> FreezeWindow | None:
    """The freeze of a completed migration record (`ferry migrate --json`), or None when
    the record lacks what it takes (no dump result, the network never opened)."""
    results = _mapping(record.get("results"))
    dumped, opened = _mapping(results.get("dump")), _mapping(results.get("open_network"))
    frozen_at = _number(dumped.get("frozen_at"))
    if frozen_at is None:
        return None
    opened_at = _number(opened.get("opened_at"))
    if opened_at is not None:
        return FreezeWindow(frozen_at, opened_at, "open_network.opened_at")
    steps = [s for s in record.get("steps") or () if isinstance(s, dict)]
    step = _done_forward(steps, "open_network")
    finished = _number(step.get("finished_at")) if step else None
    if finished is None:
        return None
    return FreezeWindow(frozen_at, finished, "open_network step end")


def freeze_slices(steps: Sequence[Mapping[str, Any]], window: FreezeWindow) -> dict[str, float]:
    """The freeze in ms, cut into each forward step's time inside it (by step name) and
    the hops between one step's end and the next one's start ("hop dump>transfer": the
    saga handing the step to the next worker). The slices add up to the freeze."""
    inside = sorted(
        (
            s for s in steps
            if s.get("kind", "forward") == "forward" and s.get("status") == "done"
            and _number(s.get("started_at")) is not None
            and _number(s.get("finished_at")) is not None
            and s["finished_at"] > window.frozen_at and s["started_at"] < window.opened_at
        ),
        key=lambda s: float(s["started_at"]),
    )  # fmt: skip
    slices: dict[str, float] = {}
    cursor, before = window.frozen_at, ""
    for s in inside:
        start = max(float(s["started_at"]), window.frozen_at)
        end = min(float(s["finished_at"]), window.opened_at)
        if before:
            slices[f"{HOP}{before}>{s['name']}"] = round(max(0.0, start - cursor) * 1000, 1)
        slices[str(s["name"])] = round(max(0.0, end - max(start, cursor)) * 1000, 1)
        cursor, before = max(cursor, end), str(s["name"])
    if cursor < window.opened_at:  # the network opened after the last step we know ended
        slices[f"{HOP}{before or 'frozen'}>open"] = round((window.opened_at - cursor) * 1000, 1)
    return slices


def step_timings(spans: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The steps as their workers ran them, from the trace's step spans ("step dump", …;
    epoch ns), shaped like the record's steps. The record's own `started_at` is when the
    step before it succeeded, so the hop to the next worker would hide inside the step."""
    steps = []
    for s in spans:
        name, attributes = str(s.get("name", "")), s.get("attributes") or {}
        if not name.startswith("step ") or not s.get("start") or not s.get("end"):
            continue
        steps.append({
            "name": name.removeprefix("step "),
            "kind": attributes.get("ferry.step_kind", "forward"),
            "status": "done" if s.get("status") == "ok" else str(s.get("status")),
            "started_at": s["start"] / 1e9,
            "finished_at": s["end"] / 1e9,
        })  # fmt: skip
    return steps


def hops_ms(slices: Mapping[str, float]) -> float:
    return round(sum(v for k, v in slices.items() if k.startswith(HOP)), 1)


def span_durations(spans: Sequence[Mapping[str, Any]], names: Iterable[str]) -> dict[str, float]:
    """ms of the last span of each name (`ferry trace --json`: start and end in epoch ns)."""
    found: dict[str, float] = {}
    for name in names:
        named = sorted(
            (s for s in spans if s.get("name") == name and s.get("start") and s.get("end")),
            key=lambda s: s["start"],
        )
        if named:
            found[name] = round((named[-1]["end"] - named[-1]["start"]) / 1e6, 1)
    return found
