"""Each host dispatches its own step commands, from the migration records it watches.

The bus lets a host publish commands only to its own work queues. So when a worker on one
host finishes a step whose successor runs on another host, it writes the record and
publishes nothing for that host: the other host's dispatcher sees the record change and
queues the command for itself (under the command's message id, so a command queued twice
is dropped by JetStream). The same watch unlocks the placements this host holds when a
saga that locked them ends: only the holder may write a placement.

A watch can miss an update (a NATS node dies under it): the watchdog's sweeps hand every
record they read to `on_record` first, so a missed command is queued a sweep later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.containers import Placement
from schemas.v2.migrations import MigrationRecord, read_record
from services import bus
from services.errors import Conflict, FerryError, NotFound, described
from services.saga.transitions import compare_and_set
from services.stores import PlacementStore
from services.tracecontext import headers_for
from workflows.saga import pending_commands

log = logging.getLogger("ferry.dispatch")

ENDED = ("completed", "rolled_back", "failed")
WATCH_RESTART_S = 1.0
WATCH_POLL_S = 1.0
WATCH_REFRESH_S = 30.0


async def release_placement(
    placements: PlacementStore, record: MigrationRecord, holder: str
) -> None:
    """A finished saga unlocks its container — written by the host that holds it, and only
    if the saga did not fail before the commit: then an operator must look, and no new move
    may start meanwhile."""
    if record.state == "failed" and not record.committed:
        return

    def unlock(placement: Placement) -> tuple[Placement | None, None]:
        if placement.migration_id != record.id or placement.host != holder:
            return None, None  # not locked by this saga, or its holder's to unlock
        return placement.model_copy(
            update={"state": "running", "migration_id": None, "destination": None}
        ), None

    try:
        await compare_and_set(placements, record.container, unlock)
    except NotFound:
        return
    except Conflict:
        log.warning("placement of %s kept changing; left locked", record.container)


class Dispatcher:
    """One host's dispatcher: queues the commands the records give to this host."""

    def __init__(self, js: JetStreamContext, host: str, placements: PlacementStore) -> None:
        self.js = js
        self.host = host
        self.placements = placements
        self.queued: set[str] = set()  # message ids queued by this process
        self.unlocked: set[str] = set()  # migrations whose end this process has dealt with

    async def on_record(self, record: MigrationRecord) -> None:
        if self.host not in (record.source, record.destination):
            return
        for command in pending_commands(record):
            if command.host != self.host or command.msg_id in self.queued:
                continue
            await bus.publish_command(self.js, command, headers_for(record.traceparent))
            self.queued.add(command.msg_id)
        if record.state in ENDED and record.id not in self.unlocked:
            await release_placement(self.placements, record, self.host)
            self.unlocked.add(record.id)
            self.queued = {m for m in self.queued if not m.startswith(f"{record.id}.")}

    async def run(self) -> None:
        """Watch every record for as long as the worker lives. nats-py does not notice an
        ordered consumer that died with its server (the watch just goes quiet), so the watch
        starts over after every reconnect and every WATCH_REFRESH_S: the records' latest
        values come again, and what was queued is not queued twice."""
        while True:
            try:
                await self._watch_until_stale()
            except Exception as exc:  # the bus may be restarting: watch again
                log.warning("record watch broke (%s); watching again", described(exc))
                await asyncio.sleep(WATCH_RESTART_S)

    async def _watch_until_stale(self) -> None:
        nc = self.js._nc
        reconnects = nc.stats["reconnects"]
        kv = await bus.bucket(self.js, subjects.MIGRATIONS_BUCKET)
        watcher: Any = await kv.watchall()  # nats-py leaves its methods untyped
        loop = asyncio.get_running_loop()
        stale_at = loop.time() + WATCH_REFRESH_S
        try:
            while loop.time() < stale_at and nc.stats["reconnects"] == reconnects:
                try:
                    entry = await watcher.updates(timeout=WATCH_POLL_S)
                except NatsTimeout:
                    continue
                if entry is None or not entry.value:
                    continue  # the end of the initial values, or a deleted record
                try:
                    await self.on_record(read_record(entry.value))
                except (FerryError, ValueError) as exc:
                    log.warning("record %s not dispatched: %s", entry.key, exc)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
