"""Intake against a real bus during a rolling upgrade: a destination whose announced wire
range overlaps the source's is accepted; one that shares no version with it is refused
(Incompatible, naming both hosts' versions) and nothing is written. `ferry hosts` shows what
each host announced."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.migrations import MigrationAccepted
from schemas.v1.versions import HostVersions
from services.cli.host_commands import host_rows
from services.errors import Incompatible
from services.intake import Intake
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from tests.support import records
from tests.support.commands import command_count
from tests.support.kv import last_sequence

REQUEST = json.dumps({"container": "web", "destination": "h2"}).encode()


async def announce(js: JetStreamContext, host: str, wire: str | None) -> None:
    """(Re-)register `host` as its agent would, announcing wire "N:MIN", or nothing at all
    (an agent older than announcements)."""
    registration = records.host_registration(host)
    if wire is not None:
        newest, oldest = (int(part) for part in wire.split(":"))
        versions = HostVersions(
            wire=newest, wire_min=oldest, ferry="0.1.0", criu="4.2.1", runc="1.1.5", kernel="6.1"
        )
        registration = registration.model_copy(update={"versions": versions})
    registry = await js.key_value(subjects.REGISTRY_BUCKET)
    await registry.put(host, registration.to_bytes())


@pytest.fixture
async def intake(
    nc: NATS,
    js: JetStreamContext,
    placements: KvPlacementStore,
    migrations: KvMigrationStore,
    hosts: KvHostDirectory,
) -> Intake:
    """Intake over h1 and h2, both alive, "web" running on h1; h1 announces wire 1..1."""
    for host in ("h1", "h2"):
        await records.put_host(js, host)
    await announce(js, "h1", "1:1")
    await records.put_placement(js, records.placement("web", "h1"))
    return Intake(nc, js, placements, migrations, hosts)


async def written(js: JetStreamContext, placements: KvPlacementStore) -> dict[str, Any]:
    return {
        "web": await placements.get("web"),
        "placement writes": await last_sequence(js, subjects.PLACEMENT_BUCKET),
        "migration writes": await last_sequence(js, subjects.MIGRATIONS_BUCKET),
        "commands": await command_count(js),
    }


@pytest.mark.parametrize("wire", ["2:1", "1:1", None], ids=["upgraded", "same", "older-agent"])
async def test_a_destination_within_the_range_is_accepted(
    js: JetStreamContext, intake: Intake, wire: str | None
) -> None:
    await announce(js, "h2", wire)
    assert isinstance(await intake.accept(REQUEST), MigrationAccepted)


@pytest.mark.parametrize(
    ("wire", "mentions"),
    [
        ("3:3", "h2 speaks wire 3..3, h1 speaks 1..1: no common version; upgrade h1"),
        ("3:2", "h2 speaks wire 2..3, h1 speaks 1..1"),
    ],
)
async def test_a_destination_sharing_no_version_is_refused_and_nothing_changes(
    js: JetStreamContext, intake: Intake, placements: KvPlacementStore, wire: str, mentions: str
) -> None:
    await announce(js, "h2", wire)
    before = await written(js, placements)
    with pytest.raises(Incompatible) as refused:
        await intake.accept(REQUEST)
    assert refused.value.field == "destination" and not refused.value.retryable
    assert mentions in refused.value.reason, refused.value.reason
    assert await written(js, placements) == before


async def test_an_older_agent_as_source_is_judged_as_wire_1(
    js: JetStreamContext, intake: Intake
) -> None:
    await announce(js, "h1", None)
    await announce(js, "h2", "3:3")
    with pytest.raises(Incompatible) as refused:
        await intake.accept(REQUEST)
    assert "h1 announced no versions (an older agent): judged as wire 1..1" in refused.value.reason


async def test_ferry_hosts_shows_what_each_host_announced(
    nc: NATS, js: JetStreamContext, intake: Intake
) -> None:
    await announce(js, "h2", None)
    h1, h2 = await host_rows(nc)
    assert h1["versions"] == {
        "wire": 1, "wire_min": 1, "ferry": "0.1.0", "criu": "4.2.1", "runc": "1.1.5",
        "kernel": "6.1",
    }  # fmt: skip
    assert "versions" not in h2  # an older agent's row keeps its old shape
