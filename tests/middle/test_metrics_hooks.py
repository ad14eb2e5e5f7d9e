"""The metrics hooks against a real bus: the runner that ends a saga counts it once though
its command comes twice, the watchdog counts the lease it found expired, and the pending
gauge reads the durable consumer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from schemas import subjects
from schemas.v1.leases import LeaseHolder, StepLease, step_lease_key
from schemas.v2.migrations import MigrationRecord, StepCommand
from services import bus as ferry_bus
from services import metrics, tracing
from services.faults import FaultPlan
from services.kvstores import KvMigrationStore
from services.leases import Leases, leases_bucket_config
from services.saga.runner import SagaRunner
from services.saga.steps import Progress, StepOutcome, StepRun
from services.watchdog import Watchdog
from tests.support import records
from tests.support.leases import TEST_TTL_S, until_state

WAIT_S = 20.0


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[InMemoryMetricReader]:
    """Metrics set up for this test only, read in memory."""
    monkeypatch.setattr(metrics, "_provider", None)
    monkeypatch.setattr(metrics, "_instruments", None)
    memory = InMemoryMetricReader()
    provider = metrics.setup_metrics("ferry-middle-test", "h1", tmp_path, readers=[memory])
    yield memory
    provider.shutdown()


def values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], Any]:
    data = reader.get_metrics_data()
    found = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        attrs = tuple(sorted((p.attributes or {}).items()))
                        found[attrs] = getattr(p, "value", getattr(p, "count", None))
    return found


def command_for(record: MigrationRecord) -> StepCommand:
    entry = record.steps[-1]
    return StepCommand(
        migration_id=record.id,
        step=entry.name,
        kind=entry.kind,
        attempt=entry.attempts,
        host=entry.host,
        role=entry.role,
    )


async def cleaned(run: StepRun, progress: Progress) -> StepOutcome:
    return StepOutcome()


@pytest.fixture
async def cleanup_runner(js: JetStreamContext, tmp_path: Path) -> AsyncIterator[None]:
    """h1's cleanup runner, whose clean_source always succeeds."""
    for host in ("h1", "h2"):
        await records.put_host(js, host)
    runner = SagaRunner(
        js,
        host="h1",
        role="cleanup",
        handlers={"clean_source": cleaned},
        telemetry=tracing.setup("ferry-middle-test", "test"),
        faults=FaultPlan(tmp_path / "h1", allowed=False),
    )
    task = asyncio.create_task(runner.run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def acked(js: JetStreamContext, host: str, role: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        info = await js.consumer_info(
            subjects.COMMANDS_STREAM, subjects.command_durable(host, role)
        )
        if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"commands of {host}/{role} not all acked in {WAIT_S} s")


async def test_the_worker_that_ends_a_saga_counts_it_once_though_its_command_comes_twice(
    js: JetStreamContext,
    migrations: KvMigrationStore,
    reader: InMemoryMetricReader,
    cleanup_runner: None,
) -> None:
    last = records.running_at("clean_source", since=time.time())
    await records.put_migration(js, last)
    command = command_for(last)
    await ferry_bus.publish_command(js, command, {})
    await acked(js, "h1", "cleanup")
    found = await migrations.get(last.id)
    assert found is not None and found[0].state == "completed"
    # The same command again (a redelivery after a crash before the ack looks the same).
    await ferry_bus.publish_command(js, command, {}, msg_id=f"{command.msg_id}.again")
    await acked(js, "h1", "cleanup")
    counted = values(reader, metrics.OUTCOMES)
    assert counted == {(("outcome", "completed"), ("strategy", "stop-and-copy")): 1}


async def test_the_watchdog_counts_a_lease_it_found_expired(
    js: JetStreamContext, migrations: KvMigrationStore, reader: InMemoryMetricReader
) -> None:
    await js.delete_key_value(subjects.LEASES_BUCKET)
    await js.create_key_value(config=leases_bucket_config(subjects.LEASES_BUCKET, TEST_TTL_S))
    leases = await Leases.open(js, StepLease)
    stuck = records.running_at("dump", since=1.0)
    await records.put_migration(js, stuck)
    entry = stuck.steps[-1]
    key = step_lease_key(stuck.id, entry.kind, entry.name, entry.attempts)
    holder = LeaseHolder(host=entry.host, role=entry.role, pid=os.getpid())
    await leases.acquire(
        key,
        StepLease(
            migration_id=stuck.id,
            step=entry.name,
            kind=entry.kind,
            attempt=entry.attempts,
            holder=holder,
        ),
    )
    watchdog = Watchdog(js, migrations)
    assert await watchdog.sweep() == 0  # held: alive, nothing counted
    assert values(reader, metrics.LEASE_EXPIRIES) == {}
    await until_state(leases, key, "expired", within_s=4 * TEST_TTL_S)
    assert await watchdog.sweep() == 1
    assert await watchdog.sweep() == 0  # moved on once: counted once
    assert values(reader, metrics.LEASE_EXPIRIES) == {(("step", "dump"),): 1}


async def test_pending_commands_are_the_consumers_waiting_and_unacked_ones(
    js: JetStreamContext, reader: InMemoryMetricReader
) -> None:
    sub = await ferry_bus.command_subscription(js, "h1", "source")
    metrics.watch_commands(sub, "h1", "source")
    record = records.running_at("preflight", since=time.time())
    for attempt in (1, 2, 3):
        command = command_for(record).model_copy(update={"attempt": attempt})
        await ferry_bus.publish_command(js, command, {})
    [held] = await sub.fetch(1, timeout=5)  # delivered, not acked
    seen = await asyncio.to_thread(values, reader, metrics.PENDING)
    assert seen == {(("host", "h1"), ("role", "source")): 3}  # 2 waiting + 1 unacked
    await held.ack()
