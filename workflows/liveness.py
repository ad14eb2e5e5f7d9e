"""Whether a step is alive, judged from evidence a watchdog holds itself (no I/O).

A step attempt is alive while its worker keeps its lease fresh: the server, not a clock on
another host, says when it stopped. Where there is no lease (nobody took the command, or it
was released without the record hearing of it), the watchdog counts on its own monotonic
clock from when it first saw that attempt (or last saw it held). The overall deadline of a
migration is judged the same way: from when this watchdog first saw the migration, never
from a deadline another host wrote with its own clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.v2.migrations import MigrationRecord
from workflows.saga import (
    Decision,
    SagaDefinition,
    StepError,
    cancelled,
    current,
    pending_commands,
    request_cancel,
    step_failed,
)

# What the leases bucket says of an attempt (services.leases.LeaseState).
Liveness = Literal["held", "expired", "released", "never_held", "unavailable"]


@dataclass(frozen=True)
class Sighting:
    """What one watchdog saw of one step attempt, on its own monotonic clock."""

    first_seen: float
    last_held: float | None = None

    def seen(self, liveness: Liveness, now: float) -> Sighting:
        return Sighting(self.first_seen, now) if liveness == "held" else self


def past_deadline(
    definition: SagaDefinition, record: MigrationRecord, first_seen: float, now: float, grace: float
) -> bool:
    """Past the migration's whole budget since this watchdog first saw it running."""
    if record.state != "running" or record.committed:
        return False
    return now > first_seen + definition.total_timeout_s + grace


def judge(
    definition: SagaDefinition,
    record: MigrationRecord,
    liveness: Liveness,
    sighting: Sighting,
    *,
    migration_first_seen: float,
    now: float,
    wall_now: float,
    grace: float,
) -> Decision | None:
    """What to do with the current step of `record`, or None to leave it be.

    `now` is the watchdog's monotonic clock (sightings are on it); `wall_now` only stamps
    what the decision writes, it is never compared with anything.
    """
    if record.state not in ("running", "compensating"):
        return None
    entry = current(record)
    if entry is None or liveness == "unavailable":
        return None  # no evidence either way: nothing is done on a guess
    late = past_deadline(definition, record, migration_first_seen, now, grace)
    where = f"{entry.name} ({entry.host})"
    if liveness == "held":
        if late and not record.cancel_requested:
            # A live step is never abandoned: stop at its boundary, then compensate.
            reason = "deadline passed without the move finishing"
            return Decision(request_cancel(record, reason, wall_now), ())
        return None
    if liveness == "expired":
        reason = f"the lease of {where} expired: its worker stopped renewing it"
    else:
        since = sighting.last_held if sighting.last_held is not None else sighting.first_seen
        timeout = definition.action(entry.name, entry.kind).timeout_s
        if now <= since + timeout + grace and not late:
            return None
        held = "held" if sighting.last_held is not None else "taken"
        reason = f"{where} not {held} by any worker for {now - since:.0f}s (this watchdog's clock)"
    if late:
        return cancelled(definition, record, "deadline passed without the move finishing", wall_now)
    command = pending_commands(record)[0]
    return step_failed(definition, record, command, StepError(reason, retryable=True), wall_now)
