"""Who owns the container decides which way a saga goes after its commit was attempted.

The commit is a compare-and-set on the placement done by the destination's worker; the
record hears of it only when that worker reports. If it never reports (a partition, a crash
loop), the saga would compensate — stop the destination, resume the source — while the
placement names the destination, and the source's copy would then be fenced off: zero
copies. So before any compensation of a saga whose commit ran, the placement is read: if it
names the destination, the saga rolls forward instead.
"""

from __future__ import annotations

import logging
import time

from schemas.v2.migrations import MigrationRecord
from services.errors import FerryError
from services.kvstores import KvMigrationStore
from services.saga.steps import StepRun, placement_of
from services.saga.transitions import transition
from services.stores import PlacementStore
from workflows.saga import (
    Decision,
    SagaDefinition,
    StepError,
    can_roll_forward,
    commit_attempted,
    is_current,
    roll_forward,
)

log = logging.getLogger("ferry.saga")


async def committed_unseen(
    definition: SagaDefinition,
    run: StepRun,
    migrations: KvMigrationStore,
    placements: PlacementStore,
) -> Decision | StepError | None:
    """For a compensation about to run: the saga rolled forward if the placement already
    names the destination; a StepError if it does but going forward is no longer safe;
    None when the compensation may run (the placement names the source)."""
    record, command = run.record, run.command
    if command.kind != "compensation" or not commit_attempted(definition, record):
        return None
    try:
        placement = await placement_of(run, placements)
    except FerryError as exc:
        # Which way to go is unknown until the placement can be read: nothing runs meanwhile.
        return StepError(f"cannot tell who owns {run.container}: {exc.reason}", retryable=True)
    if placement.host != record.destination:
        return None
    reason = (
        f"the placement names {record.destination}: the commit happened although the record"
        " never heard of it; rolling forward"
    )
    if not can_roll_forward(definition, record):
        return StepError(
            f"the placement names {record.destination} but a compensation already ran;"
            " an operator must decide which copy stays",
            retryable=False,
        )
    log.warning("migration %s: %s", record.id, reason)

    def forward(latest: MigrationRecord) -> Decision | None:
        if not is_current(latest, command):
            return None  # the record moved on meanwhile: its new step decides
        return roll_forward(definition, latest, reason, time.time())

    decision = await transition(migrations, record.id, forward)
    return decision or Decision(record, changed=False)
