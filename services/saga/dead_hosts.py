"""The one place a saga asks whether a host was declared dead (workflows/dead_hosts.py decides).

A compensation on a dead host is never taken by that host's worker, so the live workers that
start it (the runner after a step, the watchdog after a timeout) look here before the command
goes out, and the runner looks again before it runs one itself (a `resume_source` whose pages
were on the dead destination). Only compensations pay for the look-up.
"""

from __future__ import annotations

import logging
import time

from nats.js import JetStreamContext

from schemas import subjects
from schemas.v2.migrations import MigrationRecord
from services import bus
from services.errors import Conflict, NotFound
from services.kvstores import KvHostDirectory, KvMigrationStore
from services.saga.transitions import transition
from workflows.dead_hosts import DeadHosts
from workflows.dead_hosts import past_dead_hosts as decide_past_dead_hosts
from workflows.saga import Decision, SagaDefinition, current

log = logging.getLogger("ferry.saga")


async def declared_dead(js: JetStreamContext) -> DeadHosts:
    """Every host an operator declared dead, with the reason given."""
    directory = KvHostDirectory(
        await bus.bucket(js, subjects.REGISTRY_BUCKET), await bus.bucket(js, subjects.HOSTS_BUCKET)
    )
    return {host: d.reason for host, d in (await directory.declared_dead()).items()}


async def dead_host_decision(
    js: JetStreamContext,
    migrations: KvMigrationStore,
    definition: SagaDefinition,
    record: MigrationRecord,
) -> Decision | None:
    """The saga moved past a current compensation that a dead host makes pointless or
    impossible (written by compare-and-set), or None: nothing is declared dead that matters,
    the directory cannot be read (unknown: the command goes out as decided, and the next
    look sees more), or the record moved on meanwhile."""
    entry = current(record)
    if entry is None or entry.kind != "compensation":
        return None
    try:
        dead = await declared_dead(js)
    except Exception as exc:  # FerryError, or nats-py's own: the same "unknown"
        log.warning("migration %s: cannot tell whether a host is declared dead: %r", record.id, exc)
        return None
    if not dead or decide_past_dead_hosts(definition, record, dead, time.time()) is None:
        return None

    def past(latest: MigrationRecord) -> Decision | None:
        if latest != record:
            return None  # it moved on: whoever moved it looks again
        return decide_past_dead_hosts(definition, latest, dead, time.time())

    try:
        decision = await transition(migrations, record.id, past)
    except (Conflict, NotFound):
        return None
    if decision is None or not decision.changed:
        return None
    log.warning("migration %s: past what dead hosts cannot do: %s", record.id, dead)
    return decision


async def past_dead_hosts(
    js: JetStreamContext,
    migrations: KvMigrationStore,
    definition: SagaDefinition,
    decision: Decision,
) -> Decision:
    """`decision` (already written), moved past what the dead hosts cannot do; its events are
    kept, its commands replaced by what follows."""
    after = await dead_host_decision(js, migrations, definition, decision.record)
    if after is None:
        return decision
    return Decision(after.record, after.commands, (*decision.events, *after.events))
