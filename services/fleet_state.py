"""The fleet controller's state on the bus, and the check whoever acts on its decisions
makes: read by everyone, written only by the active controller (services/controller/).

`Tickets.check` is the fencing: a decision (a PlacementTicket) is acted on only if the
controller that made it still holds the lease in the same term, and its reservation is
in the chosen host's ledger. A controller that was stopped past its lease and carries on
where it was gets nothing done: its term is not the lease's any more.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from schemas import subjects
from schemas.v1.constraints import PlacementTicket
from schemas.v1.fleet import (
    ControllerLease,
    CordonDone,
    CordonHost,
    FleetState,
    HostReservations,
    PlaceContainer,
    Placed,
    PlacementChoice,
)
from services import bus
from services.errors import Conflict, InvalidInput, Unavailable, described
from services.leases import Leases


class FleetStore:
    """The fleet bucket: the controller's state and each host's reservations."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise Unavailable(f"cannot read {key!r} of the fleet: {described(exc)}") from exc
        if not entry.value:
            return None
        return entry.value, int(entry.revision or 0)

    async def _put(self, key: str, data: bytes, revision: int) -> int:
        try:
            if revision == 0:
                return int(await self.kv.create(key, data))
            return int(await self.kv.update(key, data, last=revision))
        except KeyWrongLastSequenceError as exc:
            raise Conflict(f"{key!r} of the fleet changed meanwhile") from exc
        except (NatsError, TimeoutError) as exc:
            # A create over a tombstone or a lost answer: said as a conflict only when
            # the server says so; anything else is the bus.
            if "wrong last sequence" in str(exc).lower():
                raise Conflict(f"{key!r} of the fleet changed meanwhile") from exc
            raise Unavailable(f"cannot write {key!r} of the fleet: {described(exc)}") from exc

    async def state(self) -> tuple[FleetState, int]:
        found = await self._get(subjects.FLEET_STATE_KEY)
        if found is None:
            return FleetState(), 0
        return FleetState.from_bytes(found[0]), found[1]

    async def write_state(self, state: FleetState, revision: int) -> int:
        return await self._put(subjects.FLEET_STATE_KEY, state.to_bytes(), revision)

    async def ledger(self, host: str) -> tuple[HostReservations, int]:
        found = await self._get(subjects.reservations_key(host))
        if found is None:
            return HostReservations(host=host), 0
        return HostReservations.from_bytes(found[0]), found[1]

    async def write_ledger(self, ledger: HostReservations, revision: int) -> int:
        return await self._put(subjects.reservations_key(ledger.host), ledger.to_bytes(), revision)


async def active_controller(leases: Leases[ControllerLease]) -> ControllerLease | None:
    """The controller holding the lease with its term written; None if none does (or the
    lease cannot be read: not knowing who is active is not knowing, so nothing is acted on)."""
    found = await leases.read(subjects.CONTROLLER_LEASE)
    if found.state != "held" or found.payload is None or found.payload.term == 0:
        return None
    return found.payload


class Tickets:
    """Whoever acts on a controller's decision checks it here first."""

    def __init__(self, leases: Leases[ControllerLease], fleet: FleetStore) -> None:
        self.leases = leases
        self.fleet = fleet

    async def check(
        self, ticket: PlacementTicket | None, *, host: str, container: str, field: str
    ) -> None:
        if ticket is None:
            raise InvalidInput(
                f"no placement decision from the fleet controller for {container} on {host}"
                " (`ferry container run` asks for one)",
                field=field,
            )
        if ticket.host != host:
            raise InvalidInput(
                f"the controller placed {container} on {ticket.host}, not {host}", field=field
            )
        active = await active_controller(self.leases)
        if active is None:
            raise Unavailable("no fleet controller holds its lease now; ask again", field=field)
        if (active.instance, active.term) != (ticket.instance, ticket.term):
            raise Conflict(
                f"{container} was placed by controller {ticket.instance} in term {ticket.term},"
                f" which is not the active one ({active.instance}, term {active.term}):"
                " refused; ask again",
                field=field,
            )
        ledger, _ = await self.fleet.ledger(host)
        if not any(r.container == container and r.term == ticket.term for r in ledger.entries):
            raise Conflict(
                f"no reservation for {container} on {host} in term {ticket.term}; ask again",
                field=field,
            )


PLACE_TIMEOUT_S = 15.0


async def ask_placement(nc: NATS, question: PlaceContainer) -> PlacementChoice:
    """The active controller's answer: a host with room reserved, or why none fits."""
    placed = await bus.request(
        nc,
        subjects.FLEET_PLACE,
        question,
        Placed,
        timeout=PLACE_TIMEOUT_S,
        what="the fleet controller (is a ferry-controller running?)",
    )
    return placed.choice


async def ask_cordon(nc: NATS, ask: CordonHost) -> CordonDone:
    return await bus.request(
        nc,
        subjects.FLEET_CORDON,
        ask,
        CordonDone,
        timeout=PLACE_TIMEOUT_S,
        what="the fleet controller (is a ferry-controller running?)",
    )


class FleetClient:
    """What intake needs of the fleet: a placement, and the check of its ticket."""

    def __init__(self, nc: NATS, tickets: Tickets) -> None:
        self.nc = nc
        self.tickets = tickets

    async def place(self, question: PlaceContainer) -> PlacementChoice:
        return await ask_placement(self.nc, question)

    async def check(self, ticket: PlacementTicket, *, host: str, container: str) -> None:
        await self.tickets.check(ticket, host=host, container=container, field="destination")


async def tickets(js: JetStreamContext) -> Tickets:
    """The ticket check, on the buckets it reads."""
    return Tickets(
        await Leases.open(js, ControllerLease),
        FleetStore(await bus.bucket(js, subjects.FLEET_BUCKET)),
    )
