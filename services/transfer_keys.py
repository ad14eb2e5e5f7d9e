"""A migration's transfer key, from the destination that made it to the source that needs
it, over the bus (services/runtime/transfer/auth.py says what the key proves).

The destination's transfer worker answers `ferry.v1.host.<itself>.migration.transfer-key`,
and only for the migration's source. It knows who asks from the reply subject: the bus
gives each identity inboxes under its own prefix (`_INBOX.host-<name>`, services/
identities.py) that no other identity may subscribe to, so an answer sent to
`_INBOX.host-h1.…` reaches h1 alone, whoever sent the request. It checks the record too:
the migration must be under way and name this host as its destination. The key travels
only in that answer: it is in no record, event or trace.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from nats.aio.client import Client as NATS

from schemas import subjects
from schemas.v1.transfers import TransferKey, TransferKeyRequest
from services import bus
from services.errors import FerryError, Forbidden, Unavailable
from services.kvstores import KvMigrationStore
from services.runtime.paths import MigrationPaths
from services.runtime.transfer import auth
from services.runtime.transfer.auth import Link, TlsFiles
from services.stores import PeerDirectory

log = logging.getLogger("ferry.transfer.keys")

HOST_INBOX = re.compile(r"^_INBOX\.host-(?P<host>[a-z][a-z0-9-]{0,30})\.")  # HOST_PATTERN
ASK_TIMEOUT_S = 10.0
ENDED = frozenset({"completed", "rolled_back", "failed"})


def asking_host(reply: str | None) -> str | None:
    """The host whose own inbox `reply` is, or None (not a host's inbox)."""
    found = HOST_INBOX.match(reply or "")
    return found["host"] if found else None


def _refused(subject: str, error: FerryError) -> None:
    log.warning("transfer key refused: %s", error.reason)


class KeyIssuer:
    """The destination's side: answers its migrations' sources with their keys."""

    def __init__(
        self,
        nc: NATS,
        migrations: KvMigrationStore,
        state_dir: Path,
        host: str,
        *,
        identities: bool,
    ) -> None:
        """`identities`: the bus has per-identity inboxes (this host has credentials). On
        an anonymous bus nobody is known, and the record's check is all there is."""
        self.nc = nc
        self.migrations = migrations
        self.state_dir = state_dir
        self.host = host
        self.identities = identities

    async def serve(self) -> None:
        subject = subjects.host_request(self.host, subjects.TRANSFER_KEY)
        await bus.serve_asked(self.nc, subject, TransferKeyRequest, self.answer, on_error=_refused)
        await self.nc.flush()  # the server holds the subscription before anyone is told

    async def answer(self, ask: TransferKeyRequest, reply_to: str | None) -> TransferKey:
        found = await self.migrations.get(ask.migration_id)
        if found is None:  # unknown, not "no such migration": asked again later
            raise Unavailable(f"no record of migration {ask.migration_id} (yet)")
        record, _ = found
        if record.destination != self.host:
            raise Forbidden(f"migration {record.id} does not move to {self.host}")
        if record.state in ENDED:  # a way back under way (compensating) may still pull
            raise Forbidden(f"migration {record.id} is {record.state}: no more transfers")
        asker = asking_host(reply_to)
        if self.identities and asker != record.source:
            raise Forbidden(
                f"only {record.source}, the source of migration {record.id}, gets its key"
                f" (asked by {asker or 'an identity that is not a host'})"
            )
        grant = auth.load(MigrationPaths.of(self.state_dir, record.id).root)
        if grant is None or grant.side != "issued" or grant.peer != record.source:
            raise Unavailable(f"migration {record.id} is not prepared here yet")
        return TransferKey(migration_id=record.id, key=grant.key)


class KeyHolder:
    """The source's side: the links its transfers go over, with the key each needs (asked
    for once per migration, then kept beside the migration)."""

    def __init__(
        self,
        nc: NATS,
        state_dir: Path,
        peers: PeerDirectory,
        port: int,
        tls: TlsFiles | None,
    ) -> None:
        self.nc = nc
        self.state_dir = state_dir
        self.peers = peers
        self.port = port
        self.tls = tls

    async def link_to(self, destination: str, migration_id: str) -> Link:
        address = await self.peers.address_of(destination)
        grant = await self.grant(destination, migration_id)
        return Link(address, self.port, destination, grant, self.tls)

    async def grant(self, destination: str, migration_id: str) -> auth.TransferGrant:
        root = MigrationPaths.of(self.state_dir, migration_id).root
        held = auth.load(root)
        if held is not None and held.side == "received" and held.peer == destination:
            return held
        given = await bus.request(
            self.nc,
            subjects.host_request(destination, subjects.TRANSFER_KEY),
            TransferKeyRequest(migration_id=migration_id),
            TransferKey,
            timeout=ASK_TIMEOUT_S,
            what=f"the transfer key of migration {migration_id} from {destination}",
        )
        return auth.keep_received(root, migration_id, given.key, destination=destination)
