"""The watchdog: a migration whose current step has no live worker is moved on.

Runs in every host's cleanup worker; all of them look, compare-and-set decides which one
acts. Liveness is the step's lease (services.leases): held means alive, whatever any clock
says; the server's expiry marker means its worker stopped — a failed attempt that a retry
may fix (the saga runs it again if its policy allows, compensates before the commit, or
gives up after it). A step nobody took is judged on this watchdog's own monotonic clock
from when it first saw it, and so is a migration's overall deadline: no timestamp written
by another host is compared with our clock. Nobody ever has to clean up by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from nats.js import JetStreamContext

from schemas.v1.leases import LeaseHolder, StepLease, step_lease_key
from schemas.v2.migrations import MigrationRecord
from services import metrics
from services.errors import Conflict, FerryError, NotFound, Unavailable
from services.kvstores import KvMigrationStore
from services.leases import LeaseRead, Leases
from services.saga.dead_hosts import past_dead_hosts
from services.saga.dispatch import Dispatcher
from services.saga.publish import publish_decision
from services.saga.transitions import transition
from workflows.definitions import DEFINITIONS
from workflows.liveness import Sighting, judge
from workflows.saga import Decision, current

log = logging.getLogger("ferry.watchdog")

GRACE_S = 10.0  # beyond a step's own timeout, for a command to be fetched and redelivered
INTERVAL_S = 2.0

AttemptKey = tuple[str, str, str, int]  # migration, kind, step, attempt


def attempt_of(record: MigrationRecord) -> AttemptKey | None:
    entry = current(record)
    if entry is None:
        return None
    return (record.id, entry.kind, entry.name, entry.attempts)


class Watchdog:
    """One host's watchdog and what it has seen itself, on its own monotonic clock."""

    def __init__(
        self,
        js: JetStreamContext,
        migrations: KvMigrationStore,
        *,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        grace: float = GRACE_S,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        self.js = js
        # Commands this watchdog decides go out only for its own host (the bus refuses the
        # rest; their hosts' dispatchers queue them). None: publish all (tests, one host).
        self.dispatcher = dispatcher
        self.migrations = migrations
        self.host = host or os.environ.get("FERRY_HOST", "watchdog")
        self.clock = clock
        self.grace = grace
        self.attempts: dict[AttemptKey, Sighting] = {}
        self.migrations_seen: dict[str, float] = {}

    async def sweep(self) -> int:
        """One pass over all migrations; returns how many it moved on."""
        records = await self.migrations.all()
        for seen in records:  # before anything else that may fail while the bus recovers
            await self._dispatch(seen)
        leases = await Leases.open(self.js, StepLease)
        moved = 0
        self._forget(records)
        for seen in records:
            if await self._look_at(leases, seen):
                moved += 1
        return moved

    async def _dispatch(self, record: MigrationRecord) -> None:
        """The backstop of the dispatcher's watch: what it missed is queued now."""
        if self.dispatcher is None:
            return
        try:
            await self.dispatcher.on_record(record)
        except FerryError as exc:
            log.warning("migration %s: not dispatched (%s)", record.id, exc.reason)

    def _forget(self, records: list[MigrationRecord]) -> None:
        """Drop sightings of attempts and migrations that are no longer current."""
        now = self.clock()
        live = {r.id: r for r in records if r.state in ("running", "compensating")}
        current_attempts = {a for a in map(attempt_of, live.values()) if a is not None}
        self.attempts = {k: v for k, v in self.attempts.items() if k in current_attempts}
        self.migrations_seen = {k: v for k, v in self.migrations_seen.items() if k in live}
        for migration_id, record in live.items():
            if record.state == "running":
                self.migrations_seen.setdefault(migration_id, now)

    async def _look_at(self, leases: Leases[StepLease], seen: MigrationRecord) -> bool:
        attempt = attempt_of(seen)
        if attempt is None or seen.state not in ("running", "compensating"):
            return False
        key = step_lease_key(*attempt)
        lease = await leases.read(key)
        now = self.clock()
        sighting = self.attempts.get(attempt, Sighting(first_seen=now)).seen(lease.state, now)
        self.attempts[attempt] = sighting
        if lease.state == "unavailable":
            log.warning("migration %s: step liveness unknown (%s)", seen.id, lease.reason)
            return False
        decision = judge(
            DEFINITIONS[seen.chosen],
            seen,
            lease.state,
            sighting,
            migration_first_seen=self.migrations_seen.get(seen.id, now),
            now=now,
            wall_now=time.time(),
            grace=self.grace,
        )
        if decision is None or not decision.changed:
            return False
        if not decision.commands and decision.record.cancel_requested:
            claimed = True  # a cancel request leaves the live step running: nothing to claim
        else:
            claimed = await self._claim(leases, key, seen, lease)
        if not claimed:
            return False  # a worker took the step meanwhile: look again next round
        moved = await self._apply(seen, decision)
        if moved and lease.state == "expired":
            metrics.lease_expired(attempt[2])
        return moved

    async def _claim(
        self,
        leases: Leases[StepLease],
        key: str,
        seen: MigrationRecord,
        lease: LeaseRead[StepLease],
    ) -> bool:
        """Write the attempt's lease as abandoned, over exactly what we judged: a worker that
        takes the step meanwhile makes this fail, and none can take it after."""
        entry = current(seen)
        assert entry is not None
        abandoned = StepLease(
            migration_id=seen.id,
            step=entry.name,
            kind=entry.kind,
            attempt=entry.attempts,
            holder=LeaseHolder(host=self.host, role="watchdog", pid=os.getpid()),
            abandoned=True,
        )
        try:
            await leases.renew(key, abandoned, lease.revision)
        except (Conflict, Unavailable) as exc:
            log.info("migration %s: not moved on (%s)", seen.id, exc.reason)
            return False
        return True

    async def _apply(self, seen: MigrationRecord, decision: Decision) -> bool:
        def move_on(record: MigrationRecord) -> Decision | None:
            # Only the record this sweep judged: if it moved meanwhile, it is not stuck.
            return decision if record == seen else None

        try:
            applied = await transition(self.migrations, seen.id, move_on)
        except (Conflict, NotFound):
            return False  # another host's watchdog, or the step itself, got there first
        if applied is None or not applied.changed:
            return False
        # A compensation it starts or retries on a host declared dead is moved past now.
        applied = await past_dead_hosts(self.js, self.migrations, DEFINITIONS[seen.chosen], applied)
        log.warning("migration %s: %s", seen.id, applied.record.error or "step moved on")
        metrics.saga_decided(applied)  # a move on that ended the saga (e.g. failed)
        own = self.dispatcher.host if self.dispatcher is not None else None
        await publish_decision(self.js, applied, host=own)
        return True


async def run(
    js: JetStreamContext,
    migrations: KvMigrationStore,
    dispatcher: Dispatcher,
    interval: float = INTERVAL_S,
) -> None:
    watchdog = Watchdog(js, migrations, host=dispatcher.host, dispatcher=dispatcher)
    while True:
        try:
            await watchdog.sweep()
        except Exception as exc:  # the bus may be restarting: look again next round
            log.warning("watchdog sweep failed: %s", exc)
        await asyncio.sleep(interval)
