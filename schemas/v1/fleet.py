"""The fleet controller: its lease, the state it owns (cordons), the reservations it takes,
and the placement questions it answers.

Fencing: the controller's lease carries a `term`, the lease's revision when this holder
took it. Every decision carries (instance, term); whoever acts on one (intake, the
destination worker) reads the lease and refuses a decision whose term is not the current
holder's. The controller's own state is written by compare-and-set on a key that records
the term of its writer, so a controller that lost its lease cannot overwrite it either.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.v1.base import Message, Part
from schemas.v1.constraints import Constraints, PlacementTicket
from schemas.v1.containers import ContainerNameStr, HostNameStr
from schemas.v1.leases import LeaseHolder
from schemas.v1.types import MigrationId


class ControllerLease(Message):
    """Who is the active fleet controller (leases bucket, key subjects.CONTROLLER_LEASE)."""

    holder: LeaseHolder
    instance: str = Field(min_length=1, max_length=64)
    term: int = Field(
        default=0, ge=0, description="the lease's revision when taken; 0 until written"
    )


class Cordon(Part):
    """A host that takes no new container and no incoming move."""

    reason: str = ""
    by: str = Field(description="the bus identity that asked")
    term: int = Field(ge=0, description="the controller term that wrote it")


class FleetState(Message):
    """What the active controller owns (fleet bucket, key subjects.FLEET_STATE_KEY)."""

    term: int = Field(default=0, ge=0, description="the term of the controller that wrote it")
    cordoned: dict[HostNameStr, Cordon] = Field(default_factory=dict)


Purpose = Literal["create", "move"]


class Reservation(Part):
    """Room held on a host for a container about to start or arrive there."""

    container: ContainerNameStr
    memory_mib: int = Field(ge=0)
    cpus: float = Field(ge=0)
    group: str | None = Field(default=None, description="its anti-affinity group")
    purpose: Purpose
    migration_id: MigrationId | None = None
    term: int = Field(ge=0)
    instance: str
    sweeps: int = Field(
        default=0, ge=0, description="controller sweeps that saw it without a placement"
    )


class HostReservations(Message):
    """Every reservation on one host (fleet bucket, key subjects.reservations_key(host)),
    changed only by compare-and-set: two placements can never both take the last room."""

    host: HostNameStr
    term: int = Field(
        default=0, ge=0, description="the term of its last writer; an older one may not write"
    )
    entries: tuple[Reservation, ...] = ()


class HostVerdict(Part):
    """One host as the scheduler judged it."""

    host: str
    fits: bool
    reason: str


class PlacementChoice(Part):
    """Where the scheduler put a container, and why (kept in the migration record)."""

    host: HostNameStr
    reasons: tuple[str, ...] = ()
    considered: tuple[HostVerdict, ...] = ()
    ticket: PlacementTicket
    named_by_operator: bool = Field(
        default=False, description="the host was named (--to, --host): only it was judged"
    )


class PlaceContainer(Message):
    """Ask the active controller where a container should go (subjects.FLEET_PLACE)."""

    container: ContainerNameStr
    purpose: Purpose
    memory_mib: int | None = Field(default=None, ge=4, le=65536)
    cpus: float | None = Field(default=None, gt=0, le=1024)
    constraints: Constraints = Field(default_factory=Constraints)
    source: HostNameStr | None = Field(default=None, description="a move: where it runs now")
    host: HostNameStr | None = Field(
        default=None, description="the host the operator named: judge only it"
    )
    migration_id: MigrationId | None = None
    reserve: bool = Field(default=True, description="false: only judge (a dry run)")


class Placed(Message):
    """Reply to PlaceContainer: the room is reserved on `choice.host`."""

    choice: PlacementChoice


class CordonHost(Message):
    """Cordon (or uncordon) a host (subjects.FLEET_CORDON)."""

    host: HostNameStr
    cordon: bool = True
    reason: str = Field(default="", max_length=512)


class CordonDone(Message):
    """Reply to CordonHost."""

    host: str
    cordoned: bool
    changed: bool
    term: int
