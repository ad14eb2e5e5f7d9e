"""The watchdog's sweep against a real bus: a step is judged by its lease, never by another
host's timestamps. A held lease is alive whatever the clocks say; the server's expiry marker
fails the attempt; a step nobody took is judged on the watchdog's own clock from when it
first saw it. Whatever it moves on, it moves on exactly once, however many hosts sweep."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.leases import LeaseHolder, StepLease, step_lease_key
from schemas.v2.migrations import MigrationRecord
from services import bus as ferry_bus
from services.errors import Conflict
from services.kvstores import KvMigrationStore
from services.leases import Held, Leases, leases_bucket_config
from services.watchdog import GRACE_S, Watchdog
from tests.support import records
from tests.support.commands import command_count, published_commands, step_of
from tests.support.leases import TEST_TTL_S, until_state
from tests.support.natsserver import Bus
from workflows.stop_and_copy import STOP_AND_COPY

# Timestamps another host wrote long ago: under a clock-comparing watchdog every one of
# these steps would be overdue at once.
LONG_AGO = 1.0


class Clock:
    """A watchdog's monotonic clock that the test moves on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def past_timeout_of(self, step: str) -> None:
        self.now += STOP_AND_COPY.step(step).timeout_s + GRACE_S + 1


def key_of(record: MigrationRecord) -> str:
    entry = record.steps[-1]
    return step_lease_key(record.id, entry.kind, entry.name, entry.attempts)


def worker_lease(record: MigrationRecord) -> StepLease:
    entry = record.steps[-1]
    return StepLease(
        migration_id=record.id,
        step=entry.name,
        kind=entry.kind,
        attempt=entry.attempts,
        holder=LeaseHolder(host=entry.host, role=entry.role, pid=os.getpid()),
    )


async def summary_of(migrations: KvMigrationStore, migration_id: str) -> dict[str, object]:
    got = await migrations.get(migration_id)
    assert got is not None
    return records.summary(got[0])


@pytest.fixture
async def short_leases(js: JetStreamContext) -> AsyncIterator[Leases[StepLease]]:
    """Ferry's leases bucket remade with a short TTL, so the server's expiry is quick to see."""
    await js.delete_key_value(subjects.LEASES_BUCKET)
    await js.create_key_value(config=leases_bucket_config(subjects.LEASES_BUCKET, TEST_TTL_S))
    yield await Leases.open(js, StepLease)


async def test_a_step_nobody_took_is_retried_after_the_watchdogs_own_timeout(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    stuck = records.running_at("preflight", since=LONG_AGO, deadline=LONG_AGO)
    await records.put_migration(js, stuck)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)

    # First sight: whatever started_at and the deadline say, the clock starts now.
    assert await watchdog.sweep() == 0
    clock.now += STOP_AND_COPY.step("preflight").timeout_s + GRACE_S - 1
    assert await watchdog.sweep() == 0
    clock.now += 2
    assert await watchdog.sweep() == 1

    view = await summary_of(migrations, stuck.id)
    assert view["state"] == "running" and not view["committed"]
    assert view["steps"] == [("preflight", "forward", "running", 2, "h1")]
    commands = await published_commands(js, "h1", "source")
    assert [step_of(c) for c in commands] == [(stuck.id, "preflight", "forward", 2)]
    assert await command_count(js) == 1
    # The abandoned attempt cannot be started any more by a worker that fetches it late.
    leases = await Leases.open(js, StepLease)
    with pytest.raises(Conflict):
        await leases.acquire(key_of(stuck), worker_lease(stuck))


async def test_a_held_lease_is_alive_whatever_the_clocks_say(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    # A no-retry step, started "long ago" by another host's clock, past its deadline there.
    slow = records.running_at("dump", since=LONG_AGO, deadline=LONG_AGO)
    revision = await records.put_migration(js, slow)
    leases = await Leases.open(js, StepLease)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)
    async with leases.hold(key_of(slow), worker_lease(slow)):
        for _ in range(3):
            assert await watchdog.sweep() == 0
            clock.past_timeout_of("dump")

    assert records.stored(await migrations.get(slow.id)) == (records.summary(slow), revision)
    assert await command_count(js) == 0


async def test_an_expired_lease_without_retries_starts_the_compensation(
    js: JetStreamContext, migrations: KvMigrationStore, short_leases: Leases[StepLease]
) -> None:
    assert STOP_AND_COPY.step("dump").retry.max_attempts == 1
    stuck = records.running_at("dump", since=LONG_AGO)
    await records.put_migration(js, stuck)
    # The dump's worker took its lease, then stopped renewing (killed, frozen, cut off).
    await short_leases.acquire(key_of(stuck), worker_lease(stuck))
    watchdog = Watchdog(js, migrations, clock=Clock())
    assert await watchdog.sweep() == 0  # held: alive
    await until_state(short_leases, key_of(stuck), "expired", within_s=4 * TEST_TTL_S)

    # The server's marker is the evidence: no clock has to run out.
    assert await watchdog.sweep() == 1

    view = await summary_of(migrations, stuck.id)
    assert view["state"] == "compensating"
    assert view["steps"][3] == ("dump", "forward", "failed", 1, "h1")
    # The frozen source is brought back first (the latest step is undone first).
    assert view["steps"][-1] == ("resume_source", "compensation", "running", 1, "h1")
    commands = await published_commands(js, "h1", "source")
    assert [step_of(c) for c in commands] == [(stuck.id, "resume_source", "compensation", 1)]
    assert await command_count(js) == 1


async def test_past_its_deadline_a_migration_is_rolled_back_before_the_commit(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    # Nobody works on it; the deadline is judged from this watchdog's first sight of it.
    late = records.running_at("transfer", since=LONG_AGO, deadline=LONG_AGO)
    await records.put_migration(js, late)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)
    assert await watchdog.sweep() == 0

    clock.now += STOP_AND_COPY.total_timeout_s + GRACE_S + 1
    assert await watchdog.sweep() == 1

    view = await summary_of(migrations, late.id)
    assert view["state"] in ("compensating", "rolled_back") and not view["committed"]
    assert ("transfer", "forward", "failed", 1, "h1") in view["steps"]


async def test_past_its_deadline_a_live_step_is_asked_to_stop_at_its_boundary(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    late = records.running_at("transfer", since=LONG_AGO, deadline=LONG_AGO)
    await records.put_migration(js, late)
    leases = await Leases.open(js, StepLease)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)
    async with leases.hold(key_of(late), worker_lease(late)):
        assert await watchdog.sweep() == 0
        clock.now += STOP_AND_COPY.total_timeout_s + GRACE_S + 1
        assert await watchdog.sweep() == 1
        assert await watchdog.sweep() == 0  # asked once

    view = await summary_of(migrations, late.id)
    # Nothing runs beside the live step: it is still running, with a cancel request.
    assert view["state"] == "running" and view["cancel_requested"]
    assert view["steps"][-1] == ("transfer", "forward", "running", 1, "h1")
    assert await command_count(js) == 0


async def test_a_moving_migration_is_left_alone(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    fresh = records.running_at("preflight", since=LONG_AGO)
    revision = await records.put_migration(js, fresh)
    done = records.migration_record(
        "d0d0d0d0d0d0d0d0", state="completed", committed=True, created_at=1.0
    )
    await records.put_migration(js, done)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)

    assert await watchdog.sweep() == 0
    clock.now += STOP_AND_COPY.step("preflight").timeout_s  # within timeout + grace
    assert await watchdog.sweep() == 0

    assert records.stored(await migrations.get(fresh.id)) == (records.summary(fresh), revision)
    assert await command_count(js) == 0


async def test_a_worker_that_takes_the_step_first_wins_over_the_watchdog(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    stuck = records.running_at("preflight", since=LONG_AGO)
    revision = await records.put_migration(js, stuck)
    clock = Clock()
    watchdog = Watchdog(js, migrations, clock=clock)
    assert await watchdog.sweep() == 0
    clock.past_timeout_of("preflight")
    leases = await Leases.open(js, StepLease)
    held: Held[StepLease]
    async with leases.hold(key_of(stuck), worker_lease(stuck)) as held:
        # Late, but taken: held now, so alive.
        assert await watchdog.sweep() == 0
    assert not held.lost.is_set()
    assert records.stored(await migrations.get(stuck.id)) == (records.summary(stuck), revision)


async def test_concurrent_sweeps_move_each_stuck_migration_once(
    bus: Bus, js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    ids = [f"{n:016x}" for n in range(1, 4)]
    for migration_id in ids:
        stuck = records.running_at("preflight", since=LONG_AGO, migration_id=migration_id)
        await records.put_migration(js, stuck)
    # Three hosts' watchdogs, each on its own connection with its own clock.
    others = [await ferry_bus.connect(bus.server.url, name=f"watchdog-{n}") for n in range(2)]
    clocks = [Clock() for _ in range(3)]
    try:
        watchdogs = [Watchdog(js, migrations, host="h1", clock=clocks[0])]
        for n, nc in enumerate(others, start=2):
            other_js = nc.jetstream()
            kv = await ferry_bus.bucket(other_js, subjects.MIGRATIONS_BUCKET)
            watchdogs.append(
                Watchdog(other_js, KvMigrationStore(kv), host=f"h{n}", clock=clocks[n - 1])
            )
        assert sum(await asyncio.gather(*(w.sweep() for w in watchdogs))) == 0
        for clock in clocks:
            clock.past_timeout_of("preflight")
        moved = list(await asyncio.gather(*(w.sweep() for w in watchdogs)))
        # A second round finds nothing to do: the retries are fresh to every watchdog.
        again = [await w.sweep() for w in watchdogs]
    finally:
        for nc in others:
            await nc.close()

    assert sum(moved) == len(ids), moved
    for migration_id in ids:
        view = await summary_of(migrations, migration_id)
        assert view["steps"] == [("preflight", "forward", "running", 2, "h1")]
    commands = await published_commands(js, "h1", "source")
    assert sorted(step_of(c) for c in commands) == [
        (migration_id, "preflight", "forward", 2) for migration_id in ids
    ]
    assert again == [0, 0, 0]
