"""The watchdog's sweep against a real bus: a stuck step is moved on exactly once, however
many hosts sweep at the same time; a moving migration is left alone."""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext

from schemas import subjects
from services import bus as ferry_bus
from services.kvstores import KvMigrationStore
from services.watchdog import GRACE_S, sweep
from tests.support import records
from tests.support.commands import command_count, published_commands, step_of
from tests.support.natsserver import Bus
from workflows.stop_and_copy import STOP_AND_COPY


def stuck_since(step: str) -> float:
    """A start time long enough ago for `step` to be past its timeout and the grace."""
    return time.time() - (STOP_AND_COPY.step(step).timeout_s + GRACE_S + 5)


async def test_a_stuck_step_with_retries_left_is_run_again(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    stuck = records.running_at("preflight", since=stuck_since("preflight"))
    await records.put_migration(js, stuck)

    assert await sweep(js, migrations) == 1

    got = await migrations.get(stuck.id)
    assert got is not None
    view = records.summary(got[0])
    assert view["state"] == "running" and not view["committed"]
    assert view["steps"] == [("preflight", "forward", "running", 2, "h1")]
    commands = await published_commands(js, "h1", "source")
    assert [step_of(c) for c in commands] == [(stuck.id, "preflight", "forward", 2)]
    assert await command_count(js) == 1


async def test_a_stuck_step_without_retries_starts_the_compensation(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    assert STOP_AND_COPY.step("dump").retry.max_attempts == 1
    stuck = records.running_at("dump", since=stuck_since("dump"))
    await records.put_migration(js, stuck)

    assert await sweep(js, migrations) == 1

    got = await migrations.get(stuck.id)
    assert got is not None
    view = records.summary(got[0])
    assert view["state"] == "compensating"
    assert view["steps"][3] == ("dump", "forward", "failed", 1, "h1")
    # The frozen source is brought back first (the latest step is undone first).
    assert view["steps"][-1] == ("resume_source", "compensation", "running", 1, "h1")
    commands = await published_commands(js, "h1", "source")
    assert [step_of(c) for c in commands] == [(stuck.id, "resume_source", "compensation", 1)]
    assert await command_count(js) == 1


async def test_a_migration_past_its_deadline_is_rolled_back_before_the_commit(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    now = time.time()
    late = records.running_at("transfer", since=now, deadline=now - GRACE_S - 5)
    await records.put_migration(js, late)

    assert await sweep(js, migrations) == 1

    got = await migrations.get(late.id)
    assert got is not None
    view = records.summary(got[0])
    assert view["state"] in ("compensating", "rolled_back") and not view["committed"]
    assert ("transfer", "forward", "failed", 1, "h1") in view["steps"]


async def test_a_moving_migration_is_left_alone(
    js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    fresh = records.running_at("preflight", since=time.time())
    revision = await records.put_migration(js, fresh)
    done = records.migration_record(
        "d0d0d0d0d0d0d0d0", state="completed", committed=True, created_at=1.0
    )
    await records.put_migration(js, done)

    assert await sweep(js, migrations) == 0

    assert records.stored(await migrations.get(fresh.id)) == (records.summary(fresh), revision)
    assert await command_count(js) == 0


async def test_concurrent_sweeps_move_each_stuck_migration_once(
    bus: Bus, js: JetStreamContext, migrations: KvMigrationStore
) -> None:
    ids = [f"{n:016x}" for n in range(1, 4)]
    for migration_id in ids:
        stuck = records.running_at(
            "preflight", since=stuck_since("preflight"), migration_id=migration_id
        )
        await records.put_migration(js, stuck)
    # Three hosts' watchdogs, each on its own connection.
    others = [await ferry_bus.connect(bus.server.url, name=f"watchdog-{n}") for n in range(2)]
    try:
        sweepers = [(js, migrations)]
        for nc in others:
            other_js = nc.jetstream()
            kv = await ferry_bus.bucket(other_js, subjects.MIGRATIONS_BUCKET)
            sweepers.append((other_js, KvMigrationStore(kv)))
        moved = list(await asyncio.gather(*(sweep(j, m) for j, m in sweepers)))
    finally:
        for nc in others:
            await nc.close()

    assert sum(moved) == len(ids), moved
    for migration_id in ids:
        got = await migrations.get(migration_id)
        assert got is not None
        assert records.summary(got[0])["steps"] == [("preflight", "forward", "running", 2, "h1")]
    commands = await published_commands(js, "h1", "source")
    assert sorted(step_of(c) for c in commands) == [
        (migration_id, "preflight", "forward", 2) for migration_id in ids
    ]
    # A second round finds nothing to do: the retries are fresh.
    assert await sweep(js, migrations) == 0
