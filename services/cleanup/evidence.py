"""What the leftover collector learns from the bus, read so that "unknown" never reads as "none".

A missing key counts as absent only when its bucket answers: nats-py says "key not found" for
a bucket that is gone too. A host that does not answer "do you run it?" is silent, never "no".
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.containers import ContainerRuns, RunsContainer
from services import bus
from services.cleanup.collector import PlacementSeen
from services.errors import FerryError, Unavailable
from services.kvstores import KvMigrationStore, KvPlacementStore
from workflows.fencing import Answer, Record, Where

ENDED = ("completed", "rolled_back", "failed")


async def answers(kv: KeyValue) -> bool:
    """Whether the bucket itself exists and answers right now."""
    try:
        await kv.status()
    except (NatsError, TimeoutError):
        return False
    return True


class BusEvidence:
    """The placement, migration records and other hosts' answers, for one host's collector."""

    def __init__(
        self,
        nc: NATS,
        host: str,
        placements: KvPlacementStore,
        migrations: KvMigrationStore,
        *,
        ask_timeout_s: float,
    ) -> None:
        self.nc = nc
        self.host = host
        self.placements = placements
        self.migrations = migrations
        self.ask_timeout_s = ask_timeout_s

    async def placement(self, name: str) -> PlacementSeen:
        try:
            found = await self.placements.get(name)
        except (Unavailable, ValueError):  # unreadable is unknown too
            return PlacementSeen(Where.UNAVAILABLE)
        if found is None:
            absent = await answers(self.placements.kv)
            return PlacementSeen(Where.ABSENT if absent else Where.UNAVAILABLE)
        placement, revision = found
        where = Where.HERE if placement.host == self.host else Where.ELSEWHERE
        return PlacementSeen(where, placement, revision)

    async def migration(self, migration_id: str) -> Record:
        try:
            found = await self.migrations.get(migration_id)
        except (Unavailable, ValueError):  # unreadable is unknown too
            return Record.UNAVAILABLE
        if found is None:
            return Record.MISSING if await answers(self.migrations.kv) else Record.UNAVAILABLE
        return Record.ENDED if found[0].state in ENDED else Record.LIVE

    async def ask(self, host: str, name: str) -> Answer:
        try:
            reply = await bus.request(
                self.nc,
                subjects.host_request(host, subjects.CONTAINER_RUNS),
                RunsContainer(name=name),
                ContainerRuns,
                timeout=self.ask_timeout_s,
                what=f"does {host} run {name}",
            )
        except (FerryError, NatsError, TimeoutError):  # no responder, no reply, an error
            return Answer.SILENT
        if reply.host != host or reply.name != name:
            return Answer.SILENT
        return {
            "running": Answer.RUNS,
            "paused": Answer.PAUSED,
        }.get(reply.state, Answer.NOT_RUNNING)
