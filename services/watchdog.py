"""The watchdog: a migration that makes no progress past its step's deadline is moved on.

Runs in every host's cleanup worker; all of them look, compare-and-set decides which one
acts. A stuck step counts as a failed attempt that a retry may fix: the saga runs it again
if its policy allows, compensates before the commit, or gives up after it. A migration
past its overall deadline is cancelled. Nobody ever has to clean up by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.js import JetStreamContext

from schemas.v2.migrations import MigrationRecord
from services.errors import Conflict, NotFound
from services.kvstores import KvMigrationStore
from services.saga.publish import publish_decision
from services.saga.transitions import transition
from workflows.definitions import DEFINITIONS
from workflows.saga import Decision, StepError, cancelled, current, pending_commands, step_failed

log = logging.getLogger("ferry.watchdog")

GRACE_S = 10.0  # beyond a step's own timeout, for redelivery and clock skew
INTERVAL_S = 2.0


def overdue(record: MigrationRecord, now: float, grace: float = GRACE_S) -> Decision | None:
    """What to do with a migration that stopped moving, or None if it is fine."""
    if record.state not in ("running", "compensating"):
        return None
    definition = DEFINITIONS[record.chosen]
    entry = current(record)
    if entry is None:
        return None
    if now > record.deadline + grace and record.state == "running" and not record.committed:
        return cancelled(definition, record, "deadline passed without the move finishing", now)
    timeout = definition.action(entry.name, entry.kind).timeout_s
    started = entry.started_at or record.updated_at
    if now <= started + timeout + grace:
        return None
    command = pending_commands(record)[0]
    reason = f"no progress on {entry.name} ({entry.host}) for {now - started:.0f}s"
    return step_failed(definition, record, command, StepError(reason, retryable=True), now)


async def sweep(js: JetStreamContext, migrations: KvMigrationStore) -> int:
    """One pass over all migrations; returns how many it moved on."""
    moved = 0
    for seen in await migrations.all():

        def move_on(record: MigrationRecord, seen: MigrationRecord = seen) -> Decision | None:
            # Only the record this sweep judged: if it moved meanwhile, it is not stuck.
            return overdue(record, time.time()) if record == seen else None

        try:
            decision = await transition(migrations, seen.id, move_on)
        except (Conflict, NotFound):
            continue  # another host's watchdog, or the step itself, got there first
        if decision is None or not decision.changed:
            continue
        log.warning("migration %s: %s", seen.id, decision.record.error or "stuck step retried")
        await publish_decision(js, decision)
        moved += 1
    return moved


async def run(
    js: JetStreamContext, migrations: KvMigrationStore, interval: float = INTERVAL_S
) -> None:
    while True:
        try:
            await sweep(js, migrations)
        except Exception as exc:  # the bus may be restarting: look again next round
            log.warning("watchdog sweep failed: %s", exc)
        await asyncio.sleep(interval)
