"""What the active controller does: answer where a container goes (and reserve the room
by compare-and-set), cordon and uncordon hosts, and sweep reservations that did their work.

Every write names the controller's term; the state key is written only over a state of
the same term (a successor writes its term there first), the ledgers only by
compare-and-set, and whoever acts on a reservation checks the term (services/fleet_state).
"""

from __future__ import annotations

import asyncio
import logging

from opentelemetry import trace

from schemas.v1.constraints import PlacementTicket
from schemas.v1.containers import Placement
from schemas.v1.fleet import (
    Cordon,
    CordonDone,
    CordonHost,
    HostReservations,
    HostVerdict,
    PlaceContainer,
    Placed,
    PlacementChoice,
    Reservation,
)
from schemas.v1.hosts import HostRegistration
from services.errors import Conflict, InvalidInput, NotFound, Unavailable
from services.fleet_state import FleetStore
from services.kvstores import KvHostDirectory, KvMigrationStore, KvPlacementStore
from services.leases import LeaseLost
from workflows import reservations, scheduler

log = logging.getLogger("ferry.controller")

CAS_ATTEMPTS = 8


def host_view(registration: HostRegistration, up: bool, cordoned: bool) -> scheduler.HostView:
    cpu = registration.cpu
    return scheduler.HostView(
        name=registration.host,
        zone=registration.zone,
        labels=dict(registration.labels),
        memory_mib=registration.capacity.memory_mib,
        cpus=registration.capacity.cpus,
        up=up,
        cordoned=cordoned,
        declared_dead=registration.declared_dead is not None,
        cpu_flags=frozenset(cpu.flags) if cpu is not None and cpu.flags else None,
    )


def ask_of(q: PlaceContainer, cpu_flags: frozenset[str] | None) -> scheduler.Ask:
    c = q.constraints
    return scheduler.Ask(
        container=q.container,
        memory_mib=q.memory_mib,
        cpus=q.cpus,
        constraint=scheduler.Constraint(
            zone=c.zone,
            host_labels=dict(c.host_labels),
            anti_affinity_group=c.anti_affinity.group if c.anti_affinity else None,
            anti_affinity_scope=c.anti_affinity.scope if c.anti_affinity else "host",
            pinned_host=c.pinned_host,
        ),
        leaving=q.source,
        only=q.host,
        cpu_flags=cpu_flags,
    )


# The scheduler's field names, as a request's: the CLI turns them into its flags.
FIELDS = {"host_labels": "constraints.host_labels", "zone": "constraints.zone",
          "pinned_host": "constraints.pinned_host"}  # fmt: skip


class Controller:
    """The active instance's work; `term` is set when it takes the lease."""

    def __init__(
        self,
        instance: str,
        fleet: FleetStore,
        directory: KvHostDirectory,
        placements: KvPlacementStore,
        migrations: KvMigrationStore,
    ) -> None:
        self.instance = instance
        self.fleet = fleet
        self.directory = directory
        self.placements = placements
        self.migrations = migrations
        self.term = 0
        self.lost = asyncio.Event()
        self.lost.set()  # not active until a term is taken
        self._deciding = asyncio.Lock()  # one decision at a time: zone rules span hosts

    def _require_active(self) -> None:
        if self.lost.is_set() or self.term == 0:
            raise Unavailable(f"controller {self.instance} is not the active one; ask again")

    async def take_term(self, term: int) -> None:
        """Write our term into the state, over any earlier one: from now on a controller
        of an older term cannot change it."""
        for _ in range(CAS_ATTEMPTS):
            state, revision = await self.fleet.state()
            if state.term > term:
                raise LeaseLost(f"the fleet's state is of term {state.term}, newer than {term}")
            try:
                await self.fleet.write_state(state.model_copy(update={"term": term}), revision)
            except Conflict:
                continue
            self.term = term
            break
        else:
            raise Unavailable("the fleet's state kept changing while taking the term")
        for name in await self.directory.known_hosts():
            await self._stamp(name)
        self.lost.clear()

    async def _stamp(self, host: str) -> None:
        """Put our term on a host's ledger: a controller of an older term that read it
        before cannot write it (compare-and-set), one that reads it after refuses itself."""
        for _ in range(CAS_ATTEMPTS):
            ledger, revision = await self.fleet.ledger(host)
            if ledger.term > self.term:
                raise LeaseLost(f"{host}'s ledger is of term {ledger.term}, newer than ours")
            if ledger.term == self.term:
                return
            try:
                await self.fleet.write_ledger(
                    ledger.model_copy(update={"term": self.term}), revision
                )
                return
            except Conflict:
                continue
        raise Unavailable(f"{host}'s ledger kept changing while taking the term")

    async def _write_ledger(self, ledger: HostReservations, revision: int) -> None:
        """Our write of a ledger, refused (and the lease taken for lost) if a newer term
        wrote it since."""
        if ledger.term > self.term:
            self.lost.set()
            raise Unavailable(
                f"controller {self.instance} (term {self.term}) is not the active one:"
                f" {ledger.host}'s ledger is of term {ledger.term}; ask again"
            )
        self._require_active()
        await self.fleet.write_ledger(ledger.model_copy(update={"term": self.term}), revision)

    async def _hosts(self) -> list[HostRegistration]:
        found = []
        for name in await self.directory.known_hosts():
            registration = await self.directory.registered(name)
            if registration is not None:
                found.append(registration)
        return found

    async def _views(self) -> tuple[list[scheduler.HostView], list[Placement]]:
        state, _ = await self.fleet.state()
        registrations = await self._hosts()
        views = [
            host_view(r, await self.directory.alive(r.host), r.host in state.cordoned)
            for r in registrations
        ]
        return views, await self.placements.all()

    async def place(self, q: PlaceContainer) -> Placed:
        """The host for `q`, its room reserved there (compare-and-set on its ledger)."""
        async with self._deciding:
            self._require_active()
            span = trace.get_current_span()
            for _ in range(CAS_ATTEMPTS):
                views, placements = await self._views()
                ledgers = {v.name: await self.fleet.ledger(v.name) for v in views}
                claims = reservations.claims(placements, (led for led, _ in ledgers.values()))
                flags = None
                if q.source is not None:
                    flags = next((v.cpu_flags for v in views if v.name == q.source), None)
                ask = ask_of(q, flags)
                try:
                    choice = scheduler.choose(ask, views, claims)
                except scheduler.ConstraintError as exc:
                    span.set_attribute("ferry.placement.refused", exc.reason)
                    raise InvalidInput(exc.reason, field=FIELDS.get(exc.field, exc.field)) from exc
                except scheduler.NoHostFits as exc:
                    span.set_attribute("ferry.placement.refused", str(exc))
                    raise InvalidInput(str(exc), field="host" if q.host else "constraints") from exc
                ticket = PlacementTicket(host=choice.host, term=self.term, instance=self.instance)
                placed = PlacementChoice(
                    host=choice.host,
                    reasons=choice.reasons,
                    considered=tuple(
                        HostVerdict(host=v.host, fits=v.fits, reason=v.reason)
                        for v in choice.verdicts
                    ),
                    ticket=ticket,
                    named_by_operator=q.host is not None,
                )
                span.set_attributes(
                    {
                        "ferry.container": q.container,
                        "ferry.placement.host": choice.host,
                        "ferry.placement.reasons": list(choice.reasons),
                        "ferry.placement.considered": [
                            f"{v.host}: {'fits' if v.fits else 'no'}: {v.reason}"
                            for v in choice.verdicts
                        ],
                        "ferry.controller.term": self.term,
                        "ferry.controller.instance": self.instance,
                    }
                )
                if not q.reserve:
                    return Placed(choice=placed)
                ledger, revision = ledgers[choice.host]
                group = q.constraints.anti_affinity.group if q.constraints.anti_affinity else None
                entry = Reservation(
                    container=q.container,
                    memory_mib=q.memory_mib or scheduler.DEFAULT_MEMORY_MIB,
                    cpus=q.cpus or 0.0,
                    group=group,
                    purpose=q.purpose,
                    migration_id=q.migration_id,
                    term=self.term,
                    instance=self.instance,
                )
                try:
                    await self._write_ledger(reservations.with_reservation(ledger, entry), revision)
                except Conflict:
                    continue  # someone reserved on that host meanwhile: judge again
                log.info(
                    "placed %s on %s (%s): %s",
                    q.container, choice.host, q.purpose, "; ".join(choice.reasons),
                )  # fmt: skip
                return Placed(choice=placed)
            raise Unavailable(f"the ledgers kept changing while placing {q.container}; try again")

    async def cordon(self, q: CordonHost, asker: str) -> CordonDone:
        async with self._deciding:
            self._require_active()
            if await self.directory.registered(q.host) is None:
                known = ", ".join(await self.directory.known_hosts()) or "none"
                raise NotFound(f"unknown host {q.host!r} (known: {known})", field="host")
            for _ in range(CAS_ATTEMPTS):
                state, revision = await self.fleet.state()
                if state.term != self.term:
                    self.lost.set()
                    raise Unavailable(
                        f"controller {self.instance} (term {self.term}) is not the active one:"
                        f" the fleet's state is of term {state.term}; ask again"
                    )
                cordoned = dict(state.cordoned)
                was = q.host in cordoned
                if q.cordon and not was:
                    cordoned[q.host] = Cordon(reason=q.reason, by=asker, term=self.term)
                elif not q.cordon and was:
                    del cordoned[q.host]
                else:
                    return CordonDone(host=q.host, cordoned=was, changed=False, term=self.term)
                try:
                    await self.fleet.write_state(
                        state.model_copy(update={"cordoned": cordoned}), revision
                    )
                except Conflict:
                    continue
                trace.get_current_span().set_attributes(
                    {"ferry.host": q.host, "ferry.cordoned": q.cordon, "ferry.asker": asker}
                )
                log.info("%s %s (asked by %s)", "cordoned" if q.cordon else "uncordoned",
                         q.host, asker)  # fmt: skip
                return CordonDone(host=q.host, cordoned=q.cordon, changed=True, term=self.term)
            raise Unavailable("the fleet's state kept changing; try again")

    async def sweep(self) -> None:
        """Drop the reservations that did their work (workflows/reservations.py)."""
        async with self._deciding:
            self._require_active()
            placements = {p.name: p for p in await self.placements.all()}
            for name in await self.directory.known_hosts():
                ledger, revision = await self.fleet.ledger(name)
                if not ledger.entries:
                    continue
                states = {}
                for r in ledger.entries:
                    if r.migration_id is not None:
                        found = await self.migrations.get(r.migration_id)
                        if found is not None:
                            states[r.migration_id] = found[0].state
                after, dropped = reservations.swept(ledger, reservations.Seen(placements, states))
                try:
                    await self._write_ledger(after, revision)
                except Conflict:
                    continue  # changed meanwhile: the next sweep looks again
                for why in dropped:
                    log.info("reservation dropped: %s", why)
