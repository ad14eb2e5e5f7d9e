"""The link handover at the freeze, host to host over the bus.

The source, frozen and off the bridge, asks its destination to plug the incoming container's
port in and announce its MAC (services/runtime/source_side.py, destination_side.py): what
clients send from then on waits in the destination's hold instead of being lost. The ask is
signed with the migration's transfer key (services/runtime/transfer/auth.py), which only
the source was given; the destination also checks the record (workflows/cutover.py) and,
on a bus with identities, that the answer goes to the source's own inbox. A refused or
unanswered handover costs the freeze's packets, never the move: the restore plugs the link
in anyway.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.v1.transfers import LinkHandover, LinkTaken
from services import bus
from services.errors import FerryError, Forbidden, Unavailable
from services.kvstores import KvMigrationStore
from services.runtime.destination_side import DestinationSide
from services.runtime.paths import MigrationPaths
from services.runtime.transfer import auth
from services.stores import PlacementStore
from services.transfer_keys import KeyHolder, asking_host
from workflows.cutover import refuse_link_handover

log = logging.getLogger("ferry.cutover")

HANDOVER_TIMEOUT_S = 3.0
OP = "take-link"


def _signed_fields(migration_id: str) -> dict[str, object]:
    return {"op": OP, "migration_id": migration_id}


def handover_request(grant: auth.TransferGrant) -> LinkHandover:
    signed = auth.sign(grant.secret, _signed_fields(grant.migration_id))
    return LinkHandover(migration_id=grant.migration_id, auth=str(signed[auth.AUTH_FIELD]))


class LinkGiver:
    """The source's side: asks the destination to take the link, with the migration's key."""

    def __init__(self, nc: NATS, keys: KeyHolder) -> None:
        self.nc = nc
        self.keys = keys

    async def prepared(self, destination: str, migration_id: str) -> auth.TransferGrant:
        """The key, fetched before the freeze (kept beside the migration)."""
        return await self.keys.grant(destination, migration_id)

    async def hand_over(self, destination: str, grant: auth.TransferGrant) -> bool:
        taken = await bus.request(
            self.nc,
            subjects.host_request(destination, subjects.TAKE_LINK),
            handover_request(grant),
            LinkTaken,
            timeout=HANDOVER_TIMEOUT_S,
            what=f"the link handover of migration {grant.migration_id} to {destination}",
        )
        return taken.migration_id == grant.migration_id


class LinkTaker:
    """The destination's side: takes the link for the migration's source only."""

    def __init__(
        self,
        nc: NATS,
        migrations: KvMigrationStore,
        placements: PlacementStore,
        side: DestinationSide,
        state_dir: Path,
        host: str,
        *,
        identities: bool,
    ) -> None:
        self.nc = nc
        self.migrations = migrations
        self.placements = placements
        self.side = side
        self.state_dir = state_dir
        self.host = host
        self.identities = identities

    async def serve(self) -> None:
        subject = subjects.host_request(self.host, subjects.TAKE_LINK)
        await bus.serve_asked(self.nc, subject, LinkHandover, self.answer, on_error=_refused)
        await self.nc.flush()

    async def answer(self, ask: LinkHandover, reply_to: str | None) -> LinkTaken:
        # The signature first: it needs no bus, and a forged ask costs nothing more.
        grant = auth.load(MigrationPaths.of(self.state_dir, ask.migration_id).root)
        if grant is None or grant.side != "issued":
            raise Unavailable(f"migration {ask.migration_id} is not prepared here")
        fields = {**_signed_fields(ask.migration_id), auth.AUTH_FIELD: ask.auth}
        auth.verify(grant.secret, fields, what=f"the link handover of {ask.migration_id}")
        found = await self.migrations.get(ask.migration_id)
        if found is None:  # unknown, not "no such migration"
            raise Unavailable(f"no record of migration {ask.migration_id} (yet)")
        record, _ = found
        if grant.peer != record.source:
            raise Forbidden(f"migration {record.id}'s key was issued to {grant.peer}")
        refusal = refuse_link_handover(
            record, self.host, asking_host(reply_to), identities=self.identities
        )
        if refusal:
            raise Forbidden(refusal)
        placed = await self.placements.get(record.container)
        if placed is None:
            raise Unavailable(f"no placement of {record.container} to take the link of")
        announced = await self.side.take_link(placed[0], record.id)
        log.info("took the link of %s for migration %s", record.container, record.id)
        return LinkTaken(migration_id=record.id, announced=announced)


def _refused(subject: str, error: FerryError) -> None:
    log.warning("link handover refused: %s", error.reason)
