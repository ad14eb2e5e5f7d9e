"""Intake against a real bus: an accepted request locks the container, records the migration
and queues its first step; a refused one names the field at fault and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.migrations import MigrationAccepted
from services.errors import Conflict, FerryError, InvalidInput, NotFound, Unavailable
from services.intake import Intake
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from tests.support import records
from tests.support.commands import command_count, published_commands, step_of
from tests.support.kv import last_sequence

BUSY_ID = "feedfacefeedface"


def request(**fields: Any) -> bytes:
    return json.dumps({"container": "web", "destination": "h2", **fields}).encode()


@pytest.fixture
async def intake(
    nc: NATS,
    js: JetStreamContext,
    placements: KvPlacementStore,
    migrations: KvMigrationStore,
    hosts: KvHostDirectory,
) -> Intake:
    """Intake over a fleet of h1, h2 (alive) and h3 (registered, no heartbeat), with "web"
    running on h1 and "busy" on h1 in the middle of a migration."""
    for host in ("h1", "h2"):
        await records.put_host(js, host)
    await records.put_host(js, "h3", alive=False)
    await records.put_placement(js, records.placement("web", "h1"))
    await records.put_placement(
        js,
        records.placement("busy", "h1", state="migrating", migration_id=BUSY_ID, ip="10.77.0.11"),
    )
    return Intake(nc, js, placements, migrations, hosts)


async def bus_state(js: JetStreamContext, placements: KvPlacementStore) -> dict[str, Any]:
    """The placements with their revisions and the last write to each bucket intake may
    write: equal before and after means nothing was written."""
    return {
        "web": await placements.get("web"),
        "busy": await placements.get("busy"),
        "placement writes": await last_sequence(js, subjects.PLACEMENT_BUCKET),
        "migration writes": await last_sequence(js, subjects.MIGRATIONS_BUCKET),
        "commands": await command_count(js),
    }


async def test_an_accepted_request_locks_the_container_records_it_and_queues_preflight(
    js: JetStreamContext,
    intake: Intake,
    placements: KvPlacementStore,
    migrations: KvMigrationStore,
) -> None:
    accepted = await intake.accept(request())
    assert isinstance(accepted, MigrationAccepted)

    found = await placements.get("web")
    assert found is not None
    locked = found[0]
    assert (locked.host, locked.state, locked.migration_id) == ("h1", "migrating", accepted.id)

    got = await migrations.get(accepted.id)
    assert got is not None
    assert records.summary(got[0]) == {
        "id": accepted.id,
        "container": "web",
        "source": "h1",
        "destination": "h2",
        "state": "running",
        "strategy": "stop-and-copy",  # neither host reported lazy pages or dirty tracking
        "committed": False,
        "cancel_requested": None,
        "steps": [("preflight", "forward", "running", 1, "h1")],
    }
    assert [r.id for r in await migrations.all()] == [accepted.id]

    commands = await published_commands(js, "h1", "source")
    assert [step_of(c) for c in commands] == [(accepted.id, "preflight", "forward", 1)]
    assert await command_count(js) == 1  # nothing for any other host or role


async def test_a_second_request_for_the_same_container_is_refused_once_the_first_is_in(
    js: JetStreamContext, intake: Intake, migrations: KvMigrationStore
) -> None:
    first = await intake.accept(request())
    assert isinstance(first, MigrationAccepted)
    with pytest.raises(Conflict) as refused:
        await intake.accept(request())
    assert refused.value.field == "container" and first.id in refused.value.reason
    assert [r.id for r in await migrations.all()] == [first.id]
    assert await command_count(js) == 1


REFUSALS = [
    pytest.param(request(container="nope"), NotFound, "container", "nope", id="unknown-container"),
    pytest.param(
        request(destination="h9"), NotFound, "destination", "known: h1, h2, h3", id="unknown-host"
    ),
    pytest.param(request(destination="h1"), InvalidInput, "destination", "h1", id="same-host"),
    pytest.param(request(destination="h3"), Unavailable, "destination", "h3", id="no-heartbeat"),
    pytest.param(request(container="busy"), Conflict, "container", BUSY_ID, id="migrating"),
    pytest.param(request(source="h2"), Conflict, "source", "h1", id="wrong-source"),
    pytest.param(b'{"container": "web", "to":', InvalidInput, "body", "JSON", id="bad-json"),
    pytest.param(b'["web", "h2"]', InvalidInput, "body", "object", id="not-an-object"),
    pytest.param(
        request(schema_version=2), InvalidInput, "schema_version", "2", id="schema-version"
    ),
    pytest.param(request(destination="H2!"), InvalidInput, "destination", "", id="bad-host-name"),
    pytest.param(
        request(inject_fault="restore"), InvalidInput, "inject_fault", "fault", id="faults-off"
    ),
    pytest.param(
        request(downtime_budget_ms=100),
        InvalidInput,
        "downtime_budget_ms",
        "no strategy fits the 100 ms downtime budget: stop-and-copy: 600 ms",
        id="over-budget",
    ),
]


@pytest.mark.parametrize(("payload", "error", "field", "mentions"), REFUSALS)
async def test_a_refused_request_names_the_field_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
    js: JetStreamContext,
    intake: Intake,
    placements: KvPlacementStore,
    payload: bytes,
    error: type[FerryError],
    field: str,
    mentions: str,
) -> None:
    monkeypatch.delenv("FERRY_ALLOW_FAULTS", raising=False)
    before = await bus_state(js, placements)
    assert before["web"] is not None and before["migration writes"] == 0
    with pytest.raises(FerryError) as refused:
        await intake.accept(payload)
    assert type(refused.value) is error, refused.value
    assert refused.value.field == field
    assert mentions in refused.value.reason
    assert await bus_state(js, placements) == before


async def test_a_fault_is_accepted_when_the_hosts_allow_faults(
    monkeypatch: pytest.MonkeyPatch, intake: Intake, migrations: KvMigrationStore
) -> None:
    monkeypatch.setenv("FERRY_ALLOW_FAULTS", "1")
    accepted = await intake.accept(request(inject_fault="restore"))
    assert isinstance(accepted, MigrationAccepted)
    assert await migrations.get(accepted.id) is not None


async def test_the_record_keeps_the_freeze_forecast_and_what_it_had_to_assume(
    intake: Intake, migrations: KvMigrationStore
) -> None:
    accepted = await intake.accept(request())
    assert isinstance(accepted, MigrationAccepted)
    got = await migrations.get(accepted.id)
    assert got is not None and got[0].forecast is not None
    forecast = got[0].forecast
    assert (forecast.strategy, forecast.budget_ms, forecast.fits) == ("stop-and-copy", None, True)
    assert any("not the container's holder" in m for m in forecast.missing), forecast.missing
    assert got[0].options.downtime_budget_ms == 300, "pre-copy still plans for 300 ms"


async def test_the_record_says_which_identity_asked(
    intake: Intake, migrations: KvMigrationStore
) -> None:
    accepted = await intake.accept(request(), "requester-ci")
    assert isinstance(accepted, MigrationAccepted)
    got = await migrations.get(accepted.id)
    assert got is not None and got[0].requested_by == "requester-ci"


async def test_cancel_before_the_commit_asks_the_saga_to_stop(
    intake: Intake, migrations: KvMigrationStore
) -> None:
    accepted = await intake.accept(request())
    assert isinstance(accepted, MigrationAccepted)
    asked = json.dumps({"id": accepted.id, "reason": "test says so"}).encode()
    reply = await intake.cancel(asked, "requester-ci")
    assert (reply.id, reply.state) == (accepted.id, "cancelling")
    got = await migrations.get(accepted.id)
    assert got is not None
    view = records.summary(got[0])
    assert (view["state"], view["cancel_requested"]) == (
        "running",
        "test says so (asked by requester-ci)",
    )
    assert view["steps"] == [("preflight", "forward", "running", 1, "h1")]


async def test_cancel_after_the_commit_is_refused_and_changes_nothing(
    js: JetStreamContext, intake: Intake, migrations: KvMigrationStore
) -> None:
    committed = records.running_at("open_network", since=1.0, migration_id="c0ffee00c0ffee00")
    assert committed.committed
    revision = await records.put_migration(js, committed)
    with pytest.raises(Conflict) as refused:
        await intake.cancel(json.dumps({"id": committed.id}).encode())
    assert refused.value.field == "id" and "commit" in refused.value.reason
    assert records.stored(await migrations.get(committed.id)) == (
        records.summary(committed),
        revision,
    )


async def test_cancel_of_an_unknown_migration_is_refused(
    js: JetStreamContext, intake: Intake
) -> None:
    with pytest.raises(NotFound) as refused:
        await intake.cancel(b'{"id": "0000000000000000"}')
    assert refused.value.field == "id"
    with pytest.raises(InvalidInput) as malformed:
        await intake.cancel(b'{"id": ""}')
    assert malformed.value.field == "id"
    assert await last_sequence(js, subjects.MIGRATIONS_BUCKET) == 0
