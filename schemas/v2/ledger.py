"""What each host keeps on its own disk about what it runs and the migrations it takes part
in (its "ledger"), and the request/reply that reads it for `ferry reconcile`.

The bus is the fleet's truth while it exists; the ledgers are what survives when the
JetStream store is lost: from them and runc the fleet's placements are rebuilt.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.v1.containers import ContainerNameStr, HostNameStr, Placement, RuntimeContainer
from schemas.v1.types import MigrationId
from schemas.v2.base import Message
from schemas.v2.migrations import MigrationRecord

LedgerRole = Literal["source", "destination"]


class LedgerMigration(Message):
    """One migration as one host took part in it."""

    id: MigrationId
    container: ContainerNameStr
    role: LedgerRole
    record: MigrationRecord = Field(description="the newest copy of the record this host saw")
    committed: bool = Field(
        default=False,
        description="destination: its commit's compare-and-set succeeded (and no uncommit since)",
    )
    committed_at: float | None = None
    source_done: bool = Field(
        default=False, description="source: clean_source removed its side after the commit"
    )
    updated_at: float


class ReadLedger(Message):
    """Ask a host for its ledger and what its runc runs (answered by its source worker)."""


class LedgerReport(Message):
    """Reply to ReadLedger: the host's own record of its containers and migrations, and
    runc's list, read at the same moment."""

    host: HostNameStr
    containers: tuple[Placement, ...] = Field(
        description="each container this host holds as its own, as its placement said"
    )
    migrations: tuple[LedgerMigration, ...]
    runtime: tuple[RuntimeContainer, ...] = Field(description="what runc lists on this host")
