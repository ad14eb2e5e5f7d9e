"""The saga runner against a real bus: every role's real handlers on two hosts, over a fake
host runtime. A migration requested through intake runs step by step on the right hosts,
its typed results land in the record, a failure rolls back in reverse, and a command the
record does not back — stale, redelivered or forged — runs nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v2.migrations import MigrationRecord, StepCommand
from schemas.v2.results import DumpResult, PreflightResult, StepResults
from services import bus, tracing
from services.cleanup.handlers import Cleanup
from services.destination.handlers import Destination
from services.faults import FaultPlan
from services.intake import Intake
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.link_handover import LinkGiver
from services.saga.dispatch import Dispatcher
from services.saga.runner import SagaRunner
from services.source.handlers import Source
from services.transfer.handlers import Transfer
from services.transfer_keys import KeyHolder, KeyIssuer
from tests.support import records
from tests.support.fake_sides import (
    FakeDestinationSide,
    FakeFileSync,
    FakeSourceCleanup,
    FakeSourceSide,
    Journal,
)
from workflows.stop_and_copy import STOP_AND_COPY

HOSTS = ("h1", "h2")
FINISHED = ("completed", "rolled_back", "failed")
WAIT_S = 30.0


@dataclass
class Fleet:
    """Two hosts' runners for every role, and what their runtime was asked to do."""

    js: JetStreamContext
    journal: Journal
    destinations: dict[str, FakeDestinationSide]
    intake: Intake
    migrations: KvMigrationStore
    placements: KvPlacementStore

    async def migrate(self, **request: Any) -> str:
        body = {"container": "web", "destination": "h2", "strategy": "stop-and-copy", **request}
        accepted = await self.intake.accept(json.dumps(body).encode())
        return str(getattr(accepted, "id"))  # noqa: B009 - a dry run has none

    async def finished(self, migration_id: str) -> MigrationRecord:
        """The record once the saga ended and its last command was acked — the runner acks
        after it has unlocked the placement and published what follows."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            found = await self.migrations.get(migration_id)
            if found is not None and found[0].state in FINISHED:
                await wait_until_acked(self.js)
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"migration {migration_id} did not finish in {WAIT_S} s")


@pytest.fixture
async def fleet(
    nc: NATS,
    js: JetStreamContext,
    placements: KvPlacementStore,
    migrations: KvMigrationStore,
    hosts: KvHostDirectory,
    tmp_path: Path,
) -> AsyncIterator[Fleet]:
    """h1 and h2 registered and alive, "web" running on h1, and eight runners at work."""
    for host in HOSTS:
        await records.put_host(js, host)
    await records.put_placement(js, records.placement("web", "h1"))
    journal = Journal()
    telemetry = tracing.setup("ferry-middle-test", "test")
    destinations = {h: FakeDestinationSide(h, journal) for h in HOSTS}
    runners = []
    for host in HOSTS:
        roles = {
            "source": Source(
                side=cast(Any, FakeSourceSide(host, journal)), containers=cast(Any, None),
                placements=placements, peers=hosts, page_server_for=cast(Any, None),
                keys=KeyHolder(nc, tmp_path / host, hosts, 7441, None),
                links=LinkGiver(nc, KeyHolder(nc, tmp_path / host, hosts, 7441, None)),
            ),
            "transfer": Transfer(
                files=cast(Any, FakeFileSync(host, journal)),
                keys=KeyHolder(nc, tmp_path / host, hosts, 7441, None),
                faults=FaultPlan(tmp_path / host, allowed=False),
            ),
            "destination": Destination(
                side=cast(Any, destinations[host]), containers=cast(Any, None),
                placements=placements, state_dir=tmp_path / host, peers=hosts,
            ),
            "cleanup": Cleanup(cleanup=cast(Any, FakeSourceCleanup(host, journal)),
                               containers=cast(Any, None)),
        }  # fmt: skip
        # The real key exchange, on an anonymous bus: the record's check is all there is.
        await KeyIssuer(nc, migrations, tmp_path / host, host, identities=False).serve()
        for role, handlers in roles.items():
            runner = SagaRunner(
                js, host=host, role=role,  # type: ignore[arg-type]
                handlers=handlers.steps(), telemetry=telemetry,
                faults=FaultPlan(tmp_path / host, allowed=False),
            )  # fmt: skip
            runners.append(asyncio.create_task(runner.run()))
        # Each host queues its own commands from the records (the bus refuses the others).
        own = KvPlacementStore(await js.key_value(subjects.PLACEMENT_BUCKET), author=host)
        runners.append(asyncio.create_task(Dispatcher(js, host, own).run()))
    yield Fleet(js, journal, destinations, Intake(nc, js, placements, migrations, hosts),
                migrations, placements)  # fmt: skip
    for task in runners:
        task.cancel()
    await asyncio.gather(*runners, return_exceptions=True)


@pytest.fixture(autouse=True)
def runner_never_crashes(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A command the runner could not handle is a failure here, even if redelivery hid it."""
    yield
    crashed = [
        r.getMessage() for r in caplog.get_records("call") if r.exc_info and r.name == "ferry.saga"
    ]
    assert not crashed, crashed


async def pending_commands(js: JetStreamContext) -> int:
    """Commands still waiting in the work queue or delivered and not yet acked."""
    waiting = 0
    for host in HOSTS:
        for role in ("source", "transfer", "destination", "cleanup"):
            info = await js.consumer_info(
                subjects.COMMANDS_STREAM, subjects.command_durable(host, role)
            )
            waiting += info.num_pending + info.num_ack_pending
    return waiting


async def test_a_migration_runs_every_step_on_its_host_and_hands_typed_results_on(
    fleet: Fleet, js: JetStreamContext
) -> None:
    migration_id = await fleet.migrate()
    record = await fleet.finished(migration_id)
    assert record.state == "completed" and record.committed, record.error
    expected = [(s.name, "h1" if s.side == "source" else "h2") for s in STOP_AND_COPY.steps]
    assert [(s.name, s.host) for s in record.steps] == expected
    assert all(s.status == "done" and s.attempts == 1 for s in record.steps)
    # Each step read what it needed from the record, never from the message.
    assert fleet.journal.calls == [
        ("h1", "preflight", "web"),
        ("h2", "prepare", "web"),
        ("h1", f"presync to {records.address_of('h2')}", "web"),
        ("h1", "dump to 10.77.1.2:41000", "web"),  # prepare's page server, from the record
        ("h1", f"push bundle to {records.address_of('h2')}", "web"),
        ("h2", "restore", "web"),
        ("h2", "verify [7000]", "web"),  # preflight's ports, from the record
        ("h2", "open network", "web"),
        ("h1", "clean source", "web"),
    ]
    assert record.results.dump is not None and record.results.dump.pages_written == 10
    assert record.results.transfer is not None and record.results.transfer.transfer_bytes == 2030
    assert record.freeze_ms == 25
    found = await fleet.placements.get("web")
    assert found is not None
    placement = found[0]
    assert (placement.host, placement.state, placement.migration_id) == ("h2", "running", None)


async def test_a_failed_restore_compensates_in_reverse_and_the_source_keeps_it(
    fleet: Fleet,
) -> None:
    fleet.destinations["h2"].fail_restore = True
    migration_id = await fleet.migrate()
    record = await fleet.finished(migration_id)
    assert record.state == "rolled_back" and not record.committed
    undone = [(s.name, s.host) for s in record.steps if s.kind == "compensation"]
    assert undone == [
        ("stop_destination", "h2"),
        ("resume_source", "h1"),
        ("forget_presync", "h1"),
        ("discard_destination", "h2"),
    ]
    assert "restore of web failed: injected by the test" in (record.error or "")
    assert fleet.journal.count("restore") == 1  # not retried: restore's policy says so
    found = await fleet.placements.get("web")
    assert found is not None
    assert (found[0].host, found[0].state, found[0].migration_id) == ("h1", "running", None)


async def test_a_redelivered_command_of_a_finished_step_runs_nothing_again(
    fleet: Fleet, js: JetStreamContext
) -> None:
    migration_id = await fleet.migrate()
    record = await fleet.finished(migration_id)
    dumps = fleet.journal.count("dump to 10.77.1.2:41000")
    stale = StepCommand(migration_id=migration_id, step="dump", attempt=1, host="h1",
                        role="source")  # fmt: skip
    await bus.publish_command(js, stale, {}, msg_id=f"{stale.msg_id}.again")
    await wait_until_acked(js)
    assert fleet.journal.count("dump to 10.77.1.2:41000") == dumps == 1
    after = await fleet.migrations.get(migration_id)
    assert after is not None and after[0] == record


async def test_a_command_the_record_gives_to_another_host_is_dropped_unrun(
    fleet: Fleet, js: JetStreamContext
) -> None:
    """The record, not the message, says who runs a step: a command for the current step
    naming another host, or delivered to another host's queue, runs nothing."""
    record = records.running_at("restore", since=time.time()).model_copy(
        update={
            "results": StepResults(
                preflight=PreflightResult(listening_ports=(7000,), source_pid=4242),
                dump=DumpResult(frozen_at=time.time(), dump_ms=5),
            )
        }
    )
    await records.put_migration(js, record)
    await records.put_placement(
        js, records.placement("web", "h1", state="migrating", migration_id=record.id)
    )
    # The current step, for h1's destination worker — but the record gives it to h2.
    forged = StepCommand(migration_id=record.id, step="restore", attempt=1, host="h1",
                         role="destination")  # fmt: skip
    # (Under an id of its own: one equal to the real command's would make JetStream drop
    # the real one as a duplicate — a delay the watchdog turns into a rollback, docs/trust.md.)
    await bus.publish_command(js, forged, {}, msg_id=f"{forged.msg_id}.forged")
    # A command naming h2 delivered on h1's queue.
    await js.publish(subjects.command_subject("h1", "destination"),
                     forged.model_copy(update={"host": "h2"}).to_bytes(),
                     stream=subjects.COMMANDS_STREAM)  # fmt: skip
    # The record itself gives the step to h2, whose dispatcher queues it: it runs there,
    # once, and neither forged command ran anything on h1.
    finished = await fleet.finished(record.id)
    assert fleet.journal.calls[0] == ("h2", "restore", "web")
    assert fleet.journal.count("restore") == 1
    assert [c for c in fleet.journal.calls if c[0] == "h1" and c[1] == "restore"] == []
    assert finished.state == "completed", finished.error


async def wait_until_acked(js: JetStreamContext) -> None:
    deadline = time.monotonic() + WAIT_S
    while await pending_commands(js):
        assert time.monotonic() < deadline, "commands still pending"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the runner's own writes after its ack, if any
