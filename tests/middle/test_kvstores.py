"""The JetStream-backed stores against a real nats-server: compare-and-set, listing, TTLs."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from schemas import subjects
from schemas.v2.migrations import StepCommand
from services.errors import Conflict, NotFound, Unavailable
from services.kvstores import (
    KvAddressPool,
    KvHostDirectory,
    KvMigrationStore,
    KvPlacementStore,
    _keys_without_consumer,
)
from services.saga.steps import StepRun, placement_of
from tests.support import records
from tests.support.natsserver import Bus
from workflows.placement_chain import OPERATOR_AUTHOR


async def test_a_claimed_placement_reads_back_with_its_revision(
    placements: KvPlacementStore,
) -> None:
    web = records.placement("web", "h1")
    revision = await placements.claim(web)
    assert revision > 0
    assert await placements.get("web") == (web, revision)
    assert await placements.get("nothing-here") is None


async def test_claiming_a_taken_name_is_a_conflict_that_names_the_host(
    placements: KvPlacementStore,
) -> None:
    first = records.placement("web", "h1")
    revision = await placements.claim(first)
    with pytest.raises(Conflict) as refused:
        await placements.claim(records.placement("web", "h2"))
    assert refused.value.field == "name"
    assert "on h1" in refused.value.reason
    assert await placements.get("web") == (first, revision)


async def test_a_placement_update_is_compare_and_set(placements: KvPlacementStore) -> None:
    web = records.placement("web", "h1")
    first = await placements.claim(web)
    locked = records.placement("web", "h1", state="migrating", migration_id="00000000000000e1")
    second = await placements.update(locked, first)
    assert second > first
    assert await placements.get("web") == (locked, second)

    with pytest.raises(Conflict):
        await placements.update(records.placement("web", "h2"), first)  # a stale revision
    assert await placements.get("web") == (locked, second)


async def test_removed_placements_are_gone_and_all_lists_the_rest(
    placements: KvPlacementStore,
) -> None:
    assert await placements.all() == []
    web, db = records.placement("web", "h1"), records.placement("db", "h2", ip="10.77.0.11")
    await placements.claim(web)
    await placements.claim(db)
    assert sorted(await placements.all(), key=lambda p: p.name) == [db, web]

    await placements.remove("web")
    assert await placements.get("web") is None
    assert await placements.all() == [db]
    # The name is free again.
    assert await placements.claim(records.placement("web", "h2")) > 0


async def test_a_migration_record_is_created_once(migrations: KvMigrationStore) -> None:
    record = records.migration_record("aaaa0000bbbb1111")
    revision = await migrations.create(record)
    assert records.stored(await migrations.get(record.id)) == (records.summary(record), revision)
    assert await migrations.get("ffff0000ffff0000") is None
    with pytest.raises(Conflict):
        await migrations.create(records.migration_record("aaaa0000bbbb1111", destination="h3"))
    assert records.stored(await migrations.get(record.id)) == (records.summary(record), revision)


async def test_a_migration_update_is_compare_and_set(migrations: KvMigrationStore) -> None:
    record = records.migration_record("aaaa0000bbbb1111")
    first = await migrations.create(record)
    done = records.migration_record("aaaa0000bbbb1111", state="completed", committed=True)
    second = await migrations.update(done, first)
    assert second > first
    with pytest.raises(Conflict):
        await migrations.update(records.migration_record("aaaa0000bbbb1111"), first)
    assert records.stored(await migrations.get(record.id)) == (records.summary(done), second)
    assert await migrations.is_live(record.id) is False
    assert await migrations.is_live("ffff0000ffff0000") is None


async def test_all_migrations_come_oldest_first(migrations: KvMigrationStore) -> None:
    assert await migrations.all() == []
    now = time.time()
    newer = records.migration_record("bbbb000000000000", created_at=now)
    older = records.migration_record("aaaa000000000000", container="db", created_at=now - 60)
    await migrations.create(newer)
    await migrations.create(older)
    assert [r.id for r in await migrations.all()] == ["aaaa000000000000", "bbbb000000000000"]
    assert await migrations.is_live("bbbb000000000000") is True


async def test_the_host_directory_knows_registered_hosts_and_which_are_alive(
    js: JetStreamContext, hosts: KvHostDirectory
) -> None:
    assert await hosts.known_hosts() == []
    await records.put_host(js, "h2")
    await records.put_host(js, "h1", features=("lazy_pages",))
    await records.put_host(js, "h3", alive=False)

    assert await hosts.known_hosts() == ["h1", "h2", "h3"]
    h1 = await hosts.registered("h1")
    assert h1 is not None and h1.host == "h1" and "lazy_pages" in h1.features
    assert await hosts.registered("h9") is None
    assert await hosts.address_of("h2") == records.address_of("h2")
    with pytest.raises(NotFound) as unknown:
        await hosts.address_of("h9")
    assert unknown.value.field == "host"
    assert [await hosts.alive(h) for h in ("h1", "h2", "h3", "h9")] == [True, True, False, False]


async def test_a_host_whose_heartbeat_stops_is_down_after_the_ttl_but_still_known(
    js: JetStreamContext, hosts: KvHostDirectory
) -> None:
    await records.put_host(js, "h1")
    assert await hosts.alive("h1")
    start = time.monotonic()
    while await hosts.alive("h1"):
        assert time.monotonic() - start < subjects.HEARTBEAT_TTL_S + 5, "heartbeat never expired"
        await asyncio.sleep(0.25)
    assert time.monotonic() - start >= subjects.HEARTBEAT_TTL_S - 1.5
    assert await hosts.known_hosts() == ["h1"]
    assert await hosts.registered("h1") is not None
    await records.put_heartbeat(js, "h1")
    assert await hosts.alive("h1")


async def test_addresses_are_allocated_once_and_released_only_by_their_owner(
    addresses: KvAddressPool,
) -> None:
    pool = ["10.77.0.10", "10.77.0.11"]
    assert await addresses.allocate("web", pool) == "10.77.0.10"
    assert await addresses.allocate("db", pool) == "10.77.0.11"
    with pytest.raises(Unavailable):
        await addresses.allocate("cache", pool)
    assert await addresses.owners() == {"10.77.0.10": "web", "10.77.0.11": "db"}

    await addresses.release("10.77.0.10", "db")  # not db's: nothing happens
    with pytest.raises(Unavailable):
        await addresses.allocate("cache", pool)
    assert await addresses.owners() == {"10.77.0.10": "web", "10.77.0.11": "db"}
    await addresses.release("10.77.0.10", "web")
    await addresses.release("10.77.0.99", "web")  # never allocated: nothing happens
    assert await addresses.owners() == {"10.77.0.11": "db"}
    assert await addresses.allocate("cache", pool) == "10.77.0.10"


async def test_listing_reports_unavailable_while_the_bus_is_down_and_works_after_restart(
    bus: Bus, placements: KvPlacementStore
) -> None:
    web = records.placement("web", "h1")
    await placements.claim(web)
    # A short JetStream timeout, so each of the store's attempts gives up quickly.
    quick_js = bus.nc.jetstream(timeout=0.5)
    quick = KvPlacementStore(
        await quick_js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
    )

    bus.server.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await quick.all()
    assert time.monotonic() - started < 5

    bus.server.restart()
    after = await asyncio.wait_for(quick.all(), timeout=10)
    assert after == [web]  # the file store kept it


async def test_listing_retries_through_a_short_bus_restart(bus: Bus) -> None:
    js = bus.nc.jetstream(timeout=1.0)
    store = KvPlacementStore(await js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR)
    web = records.placement("web", "h1")
    await store.claim(web)

    bus.server.stop()
    listing = asyncio.create_task(store.all())
    await asyncio.sleep(0.3)
    assert not listing.done()
    bus.server.restart()
    answer = await asyncio.wait_for(listing, timeout=10)  # no Unavailable: it tried again
    assert answer == [web]


async def test_listing_a_bucket_that_has_keys_never_answers_empty(
    placements: KvPlacementStore,
) -> None:
    await placements.claim(records.placement("web", "h1"))
    await placements.claim(records.placement("db", "h2", ip="10.77.0.11"))
    answers = [len(await placements.all()) for _ in range(150)]
    assert answers.count(0) == 0, f"{answers.count(0)} of {len(answers)} listings were empty"


async def test_keys_read_without_a_consumer_are_the_live_keys(bus: Bus) -> None:
    kv = await bus.js.key_value(subjects.MIGRATIONS_BUCKET)
    for key in ("a", "b", "c", "d"):
        await kv.put(key, b"x")
    await kv.put("b", b"y")  # two messages on one subject: one key
    await kv.delete("c")
    await kv.purge("d")
    assert await _keys_without_consumer(kv) == ["a", "b"]
    assert sorted(await kv.keys()) == ["a", "b"]


async def test_listing_goes_on_while_the_bus_refuses_consumers(
    migrations: KvMigrationStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = records.migration_record("aaaa0000bbbb1111")
    await migrations.create(first)

    async def refused(*_: object, **__: object) -> list[str]:
        raise BadRequestError(description="consumer create failed")  # as make chaos saw

    monkeypatch.setattr(migrations.kv, "keys", refused)
    assert [r.id for r in await migrations.all()] == ["aaaa0000bbbb1111"]


async def test_reading_a_key_while_the_bus_is_down_is_unavailable_not_absent(bus: Bus) -> None:
    quick_js = bus.nc.jetstream(timeout=0.5)
    placements = KvPlacementStore(
        await quick_js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
    )
    migrations = KvMigrationStore(await quick_js.key_value(subjects.MIGRATIONS_BUCKET))
    await placements.claim(records.placement("web", "h1"))

    bus.server.stop()
    for read in (placements.get("web"), migrations.get("0123456789abcdef")):
        with pytest.raises(Unavailable) as down:
            await read
        assert down.value.retryable  # a retry may succeed; None would have said "no such key"
    bus.server.restart()
    deadline = time.monotonic() + 10
    while True:  # until the client has reconnected: then the key is there, as it was
        try:
            found = await placements.get("web")
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the bus did not come back"
            await asyncio.sleep(0.1)
    assert found is not None and found[0].host == "h1"


async def test_a_step_reads_its_placement_through_a_short_bus_restart(bus: Bus) -> None:
    """A step's placement read is retried inside the step: a restore (never retried by the
    saga) must not roll back because the bus blinked."""
    js = bus.nc.jetstream(timeout=0.5)
    placements = KvPlacementStore(
        await js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
    )
    await placements.claim(records.placement("web", "h1"))
    record = records.running_at("restore", since=time.time())
    run = StepRun(StepCommand(migration_id=record.id, step="restore", attempt=1, host="h2",
                              role="destination"), record)  # fmt: skip

    bus.server.stop()
    reading = asyncio.create_task(placement_of(run, placements))
    await asyncio.sleep(0.3)
    bus.server.restart()
    placement = await asyncio.wait_for(reading, timeout=10)
    assert placement.name == "web" and placement.host == "h1"
