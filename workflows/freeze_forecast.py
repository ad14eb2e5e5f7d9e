"""A move's freeze, forecast before it starts, from the container's memory and the moves
this host made before. Pure: the caller brings the memory and the history.

    freeze = fixed + pages that travel inside the freeze / stream rate

- fixed: everything in the freeze but the page stream (runc, CRIU's own work, the saga's
  steps, the cut-over), per strategy: earlier moves' measured freeze less their page stream.
- pages inside the freeze: stop-and-copy, all of the memory; post-copy, none (they follow
  after the network opens); pre-copy, what its last round leaves, which it plans to fit
  the budget.
- stream rate: earlier moves' page bytes over CRIU's time streaming them (its memdump
  time, with the writes onto the wire inside it).

Earlier moves to the same destination count first, then to any. Where none exists a
named default stands in, and the forecast lists it as missing: an SRE sees which number
was measured and which was assumed.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from schemas.v2.forecast import FreezeForecast
from schemas.v2.migrations import MigrationRecord
from workflows.precopy import PAGE_SIZE
from workflows.strategy import GUIDE_MS

# From this repository's bench on a small VM (bench/results-table.txt): used only until
# this host has moved something, and then named in the forecast as assumed.
DEFAULT_FIXED_MS = {"stop-and-copy": 600.0, "post-copy": 700.0, "pre-copy": 600.0}
DEFAULT_STREAM_MIB_S = 100.0
RECENT = 5  # the newest moves of a kind that count: hosts and their load change


@dataclass(frozen=True)
class PastFreeze:
    """One completed move from this host, as the forecast learns from it."""

    strategy: str
    destination: str
    freeze_ms: float  # first frozen instant until the destination's network opened
    page_bytes: int  # pages that travelled inside the freeze
    stream_ms: float  # CRIU's time streaming them
    ended_at: float

    @property
    def fixed_ms(self) -> float:
        return max(self.freeze_ms - self.stream_ms, 0.0)

    @property
    def stream_mib_s(self) -> float | None:
        if self.page_bytes <= 0 or self.stream_ms <= 0:
            return None
        return self.page_bytes / 2**20 / (self.stream_ms / 1000)


def past_freeze(record: MigrationRecord) -> PastFreeze | None:
    """What a completed move says about freezes; None when it did not complete or did not
    measure its freeze (an older worker, a result missing)."""
    if record.state != "completed":
        return None
    dump, opened = record.results.dump, record.results.open_network
    if dump is None or opened is None:
        return None
    inside = record.chosen != "post-copy"  # post-copy's pages come after the opening
    page_bytes = dump.pages_written * PAGE_SIZE if inside else 0
    # CRIU writes the pages onto the wire while it dumps them: the longer time is the stream.
    stream_us = max(dump.criu_memdump_us, dump.criu_memwrite_us) if inside else 0
    return PastFreeze(
        strategy=record.chosen,
        destination=record.destination,
        freeze_ms=float(opened.frozen_to_open_ms),
        page_bytes=page_bytes,
        stream_ms=stream_us / 1000,
        ended_at=record.updated_at,
    )


def history_of(records: Iterable[MigrationRecord], source: str) -> list[PastFreeze]:
    """The freezes of this host's completed moves as the source, newest first."""
    past = [p for r in records if r.source == source and (p := past_freeze(r)) is not None]
    return sorted(past, key=lambda p: p.ended_at, reverse=True)


def _nearest(history: Sequence[PastFreeze], destination: str) -> tuple[list[PastFreeze], str]:
    """The moves that count, and how to say where they came from: to this destination if
    there are any, else to any destination."""
    same = [p for p in history if p.destination == destination]
    if same:
        return same[:RECENT], f"to {destination}"
    return list(history[:RECENT]), "to other hosts"


def forecast(
    strategy: str,
    *,
    memory_bytes: int,
    memory_basis: str,
    destination: str,
    history: Sequence[PastFreeze],
    budget_ms: int | None,
    missing: Sequence[str] = (),
) -> FreezeForecast:
    """The freeze `strategy` would cause moving `memory_bytes` to `destination`."""
    assumed = list(missing)
    fixed_from, where = _nearest([p for p in history if p.strategy == strategy], destination)
    if fixed_from:
        fixed = statistics.median(p.fixed_ms for p in fixed_from)
        basis = f"fixed cost from {len(fixed_from)} earlier {strategy} move(s) {where}"
    else:
        fixed = DEFAULT_FIXED_MS[strategy]
        basis = f"no earlier {strategy} move from this host"
        assumed.append(f"fixed cost: no earlier {strategy} move from this host, {fixed:.0f} ms")
    rated, rated_where = _nearest([p for p in history if p.stream_mib_s], destination)
    if rated:
        rate = statistics.median(p.stream_mib_s or 0.0 for p in rated)
        basis += f"; stream rate from {len(rated)} move(s) {rated_where}"
    else:
        rate = DEFAULT_STREAM_MIB_S
        assumed.append(f"stream rate: no earlier page stream from this host, {rate:.0f} MiB/s")
    all_pages_ms = memory_bytes / 2**20 / rate * 1000
    if strategy == "post-copy":
        pages_ms = 0.0
    elif strategy == "pre-copy":
        # Its rounds go on until the rest fits the budget (300 ms when none was given).
        left = max((budget_ms or GUIDE_MS) - fixed, 0.0)
        pages_ms = min(all_pages_ms, left)
        assumed.append("dirty rate: not measured before the first round; the last round fits")
    else:
        pages_ms = all_pages_ms
    return FreezeForecast(
        strategy=strategy,
        predicted_ms=round(fixed + pages_ms),
        fixed_ms=round(fixed),
        pages_ms=round(pages_ms),
        memory_bytes=memory_bytes,
        memory_basis=memory_basis,
        stream_mib_s=round(rate, 1) if strategy != "post-copy" else None,
        basis=basis,
        missing=tuple(assumed),
        budget_ms=budget_ms,
    )
