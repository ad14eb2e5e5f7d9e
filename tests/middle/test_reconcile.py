"""`ferry reconcile` against a real bus: it asks every registered host for its ledger, and
with --apply writes placements (by create), their address claims, and re-creates each
migration the loss caught, publishing what the saga does next."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.containers import RuntimeContainer
from schemas.v2.ledger import LedgerReport, ReadLedger
from services import bus as ferry_bus
from services.cli.reconcile_commands import apply_plan, gather_plan
from services.errors import Unavailable
from services.kvstores import KvMigrationStore, KvPlacementStore
from services.runtime.ledger import HostLedger
from tests.support.commands import published_commands
from tests.support.records import placement, put_host, put_placement, running_at


async def serve_ledger(nc: NATS, book: HostLedger, runs: tuple[str, ...]) -> None:
    """What a host's source worker answers, from a ledger on disk."""

    async def read(_: ReadLedger) -> LedgerReport:
        return LedgerReport(
            host=book.host,
            containers=tuple(book.containers()),
            migrations=tuple(book.migrations()),
            runtime=tuple(RuntimeContainer(name=n, state="running", pid=1) for n in runs),
        )

    await ferry_bus.serve(
        nc, subjects.host_request(book.host, subjects.HOST_LEDGER), ReadLedger, read
    )


async def test_apply_writes_placements_addresses_and_ends_migrations(
    nc: NATS, js: JetStreamContext, placements: KvPlacementStore,
    migrations: KvMigrationStore, tmp_path: Path,
) -> None:  # fmt: skip
    h1, h2 = HostLedger(tmp_path / "h1", "h1"), HostLedger(tmp_path / "h2", "h2")
    h1.held(placement("web", "h1"))
    h1.held(placement("db", "h1", ip="10.77.0.11"))
    caught = running_at("restore", since=1.0).model_copy(update={"container": "db"})
    h1.saw(caught)
    h2.saw(caught)
    for book, runs in ((h1, ("web",)), (h2, ("db",))):
        await put_host(js, book.host)
        await serve_ledger(nc, book, runs)
    await put_placement(js, placement("other", "h2", ip="10.77.0.12"))

    plan = await gather_plan(nc)
    assert plan.answered == ("h1", "h2") and plan.blocked is None
    applied = await apply_plan(nc, plan)
    assert applied["refused"] == [], applied

    found = {p.name: p for p in await placements.all()}
    assert (found["web"].host, found["web"].state) == ("h1", "running")
    assert (found["db"].host, found["db"].state, found["db"].migration_id) == (
        "h1", "migrating", caught.id,
    )  # fmt: skip
    ipam = await ferry_bus.bucket(js, subjects.IPAM_BUCKET)
    assert (await ipam.get(subjects.ip_key("10.77.0.11"))).value == b"db"
    record = await migrations.get(caught.id)
    assert record is not None and record[0].state == "compensating"
    entry = [s for s in record[0].steps if s.status == "running"][-1]
    queued = await published_commands(js, entry.host, entry.role)
    assert [(c["migration_id"], c["step"]) for c in queued] == [(caught.id, entry.name)]

    # Again: everything exists now, nothing is written twice.
    again = await apply_plan(nc, await gather_plan(nc))
    assert again == {"written": [], "refused": []}


async def test_a_silent_host_blocks_the_writes(
    nc: NATS, js: JetStreamContext, placements: KvPlacementStore, tmp_path: Path
) -> None:
    h1 = HostLedger(tmp_path / "h1", "h1")
    h1.held(placement("web", "h1"))
    await put_host(js, "h1")
    await put_host(js, "h2")  # registered, nobody serves its ledger
    await serve_ledger(nc, h1, ("web",))
    plan = await gather_plan(nc)
    assert set(plan.silent) == {"h2"}
    with pytest.raises(Unavailable, match="h2"):
        await apply_plan(nc, plan)
    assert await placements.all() == []
