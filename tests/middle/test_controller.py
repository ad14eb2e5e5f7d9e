"""The fleet controller's decisions against a real bus: reservations by compare-and-set never
overbook a host, even with two deciders racing; a controller of an older term gets nothing
done; the sweep drops only reservations that did their work."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js import JetStreamContext

from schemas import subjects
from schemas.v1.constraints import AntiAffinity, Constraints
from schemas.v1.fleet import ControllerLease, CordonHost, PlaceContainer
from schemas.v1.hosts import HostCapacity, HostRegistration
from schemas.v1.leases import LeaseHolder
from services import bus as ferry_bus
from services.controller.placing import Controller
from services.errors import Conflict, FerryError, InvalidInput, Unavailable
from services.fleet_state import FleetStore, Tickets
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.leases import Leases
from tests.support import records
from workflows import reservations

HOSTS = {"h1": ("a", 1024), "h2": ("b", 512), "h3": ("b", 512)}


async def _register(js: JetStreamContext) -> None:
    registry = await js.key_value(subjects.REGISTRY_BUCKET)
    for host, (zone, memory) in HOSTS.items():
        registration = HostRegistration(
            host=host,
            address=records.address_of(host),
            registered_at=time.time(),
            zone=zone,
            capacity=HostCapacity(memory_mib=memory, cpus=2),
        )
        await registry.put(host, registration.to_bytes())
        await records.put_heartbeat(js, host)


async def _controller(
    js: JetStreamContext, instance: str, placements: KvPlacementStore, hosts: KvHostDirectory,
    migrations: KvMigrationStore,
) -> Controller:  # fmt: skip
    fleet = FleetStore(await ferry_bus.bucket(js, subjects.FLEET_BUCKET))
    return Controller(instance, fleet, hosts, placements, migrations)


async def _take_lease(js: JetStreamContext, instance: str, last: int = 0) -> int:
    """Write the controller lease as `instance` would on taking it: its term is the revision."""
    leases = Leases(js, ControllerLease)
    payload = ControllerLease(holder=LeaseHolder(host=instance, role="controller", pid=1),
                              instance=instance)  # fmt: skip
    if last:
        await leases.release(subjects.CONTROLLER_LEASE, last)
    term = await leases.acquire(subjects.CONTROLLER_LEASE, payload)
    await leases.renew(subjects.CONTROLLER_LEASE, payload.model_copy(update={"term": term}), term)
    return term


def _ask(name: str, memory: int, **constraints: object) -> PlaceContainer:
    return PlaceContainer(
        container=name, purpose="create", memory_mib=memory,
        constraints=Constraints.model_validate(constraints),
    )  # fmt: skip


@pytest.fixture
async def fleet(
    js: JetStreamContext,
    placements: KvPlacementStore,
    hosts: KvHostDirectory,
    migrations: KvMigrationStore,
) -> tuple[Controller, Controller]:
    await _register(js)
    first = await _controller(js, "c1", placements, hosts, migrations)
    second = await _controller(js, "c2", placements, hosts, migrations)
    return first, second


async def test_two_deciders_racing_never_overbook_a_host(
    js: JetStreamContext, fleet: tuple[Controller, Controller]
) -> None:
    """Twenty asks of 100 MiB for zone b (h2, h3: 512 MiB each), from two deciders that do
    not share a lock: exactly five fit on each host, and no ledger ever holds more."""
    first, second = fleet
    term = await _take_lease(js, "c1")
    await first.take_term(term)
    second.instance, second.term = "c1", term  # the same term: only the CAS keeps them apart
    second.lost.clear()

    async def one(decider: Controller, i: int) -> str | None:
        try:
            return (await decider.place(_ask(f"z{i}", 100, zone="b"))).choice.host
        except InvalidInput as exc:
            assert "no host fits" in exc.reason
            return None

    placed = await asyncio.gather(*(one((first, second)[i % 2], i) for i in range(24)))
    store = FleetStore(await js.key_value(subjects.FLEET_BUCKET))
    for host in ("h2", "h3"):
        ledger, _ = await store.ledger(host)
        assert sum(r.memory_mib for r in ledger.entries) <= 512
        assert len(ledger.entries) == placed.count(host) == 5
    assert placed.count(None) == 14
    assert "h1" not in placed  # zone a is never chosen for zone b


async def test_anti_affinity_by_zone_and_no_host_fits_names_every_host(
    js: JetStreamContext, fleet: tuple[Controller, Controller]
) -> None:
    first, _ = fleet
    await first.take_term(await _take_lease(js, "c1"))
    anti = AntiAffinity(group="db", scope="zone").model_dump()
    zones = set()
    for name in ("db1", "db2"):
        host = (await first.place(_ask(name, 64, anti_affinity=anti))).choice.host
        zones.add(HOSTS[host][0])
    assert zones == {"a", "b"}
    with pytest.raises(InvalidInput) as refused:
        await first.place(_ask("db3", 64, anti_affinity=anti))
    assert refused.value.field == "constraints"
    for host in HOSTS:
        assert f"{host}:" in refused.value.reason
    with pytest.raises(InvalidInput) as unknown:
        await first.place(_ask("x", 64, zone="nowhere"))
    assert unknown.value.field == "constraints.zone" and "nowhere" in unknown.value.reason


async def test_a_controller_of_an_older_term_gets_nothing_done(
    js: JetStreamContext, fleet: tuple[Controller, Controller]
) -> None:
    """c1 decides (a ticket); c2 takes the lease and its term; c1 carries on as if nothing
    happened: its placement and its cordon are refused, and its earlier ticket too."""
    old, new = fleet
    old_term = await _take_lease(js, "c1")
    await old.take_term(old_term)
    ticket = (await old.place(_ask("early", 64))).choice.ticket
    store = FleetStore(await js.key_value(subjects.FLEET_BUCKET))
    tickets = Tickets(Leases(js, ControllerLease), store)
    await tickets.check(ticket, host=ticket.host, container="early", field="placed")

    lease = await Leases(js, ControllerLease).read(subjects.CONTROLLER_LEASE)
    new_term = await _take_lease(js, "c2", last=lease.revision)
    await new.take_term(new_term)
    before = {h: await store.ledger(h) for h in HOSTS}
    state_before = await store.state()

    with pytest.raises(Unavailable):
        await old.place(_ask("late", 64))
    old.lost.clear()  # even if it did not notice: the state's term refuses its cordon
    with pytest.raises(Unavailable):
        await old.cordon(CordonHost(host="h1", reason="stale"), "operator")
    with pytest.raises(Conflict) as stale:
        await tickets.check(ticket, host=ticket.host, container="early", field="placed")
    assert f"term {old_term}" in stale.value.reason
    for host in HOSTS:  # nothing written by the old term (the new one stamped its term)
        ledger, revision = await store.ledger(host)
        assert revision == before[host][1] and ledger.term == new_term
    assert await store.state() == state_before
    done = await new.cordon(CordonHost(host="h1", reason="maintenance"), "operator")
    assert done.cordoned and done.changed and done.term == new_term


async def test_the_sweep_drops_only_what_did_its_work(
    js: JetStreamContext, fleet: tuple[Controller, Controller]
) -> None:
    first, _ = fleet
    await first.take_term(await _take_lease(js, "c1"))
    created = (await first.place(_ask("made", 64))).choice.host
    pending = (await first.place(_ask("pending", 64))).choice.host
    await records.put_placement(js, records.placement("made", created))
    await first.sweep()
    store = FleetStore(await js.key_value(subjects.FLEET_BUCKET))
    left = {r.container for h in HOSTS for r in (await store.ledger(h))[0].entries}
    assert left == {"pending"}, "the placed one goes, the one not placed yet stays"
    for _ in range(reservations.RESERVATION_SWEEPS):
        await first.sweep()
    assert not (await store.ledger(pending))[0].entries, "never placed: gone after its sweeps"


async def test_an_unknown_host_cannot_be_cordoned(
    js: JetStreamContext, fleet: tuple[Controller, Controller]
) -> None:
    first, _ = fleet
    await first.take_term(await _take_lease(js, "c1"))
    with pytest.raises(FerryError) as unknown:
        await first.cordon(CordonHost(host="h7"), "operator")
    assert unknown.value.field == "host"
