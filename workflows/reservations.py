"""Room held on hosts: what the scheduler counts besides the placements, and when a
reservation has done its work. Pure: the controller reads the bus and writes the result
by compare-and-set (services/controller/).

A reservation is taken for a container about to start on a host (purpose create) or to
arrive there in a move (purpose move). It is never "released" by the one who acts on it
(a host cannot write the fleet's state): it goes when the controller sees it no longer
matters — the container's placement now counts it, or the move ended — or when it was
seen on `RESERVATION_SWEEPS` sweeps without its container ever being placed (a start that
was refused or whose asker died). Keeping one too long only leaves a host emptier than it
could be; dropping one too early could overbook it, so only evidence drops it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from schemas.v1.containers import Placement
from schemas.v1.fleet import HostReservations, Reservation
from workflows.scheduler import DEFAULT_MEMORY_MIB, Claim

RESERVATION_SWEEPS = 12
TERMINAL = ("completed", "rolled_back", "failed")


def claim_of(placement: Placement, host: str, kind: str) -> Claim:
    spec = placement.spec
    group = spec.constraints.anti_affinity.group if spec.constraints.anti_affinity else None
    return Claim(
        container=placement.name,
        host=host,
        memory_mib=spec.memory_mib or DEFAULT_MEMORY_MIB,
        cpus=spec.cpus or 0.0,
        group=group,
        kind=kind,  # type: ignore[arg-type]
    )


def claims(
    placements: Iterable[Placement], ledgers: Iterable[HostReservations]
) -> tuple[Claim, ...]:
    """Every claim on every host: a placed container on its host, a moving one on its
    destination too, and every reservation (the scheduler counts each container once a host)."""
    found: list[Claim] = []
    for p in placements:
        found.append(claim_of(p, p.host, "running"))
        if p.state == "migrating" and p.destination is not None:
            found.append(claim_of(p, p.destination, "incoming"))
    for ledger in ledgers:
        found += [
            Claim(r.container, ledger.host, r.memory_mib, r.cpus, r.group, "reserved")
            for r in ledger.entries
        ]
    return tuple(found)


def with_reservation(ledger: HostReservations, entry: Reservation) -> HostReservations:
    """The ledger with `entry` in it, replacing the same container's earlier one (an asker
    that retries holds one reservation, not two)."""
    kept = tuple(r for r in ledger.entries if r.container != entry.container)
    return ledger.model_copy(update={"entries": (*kept, entry)})


@dataclass(frozen=True)
class Seen:
    """What the controller read for one sweep."""

    placements: Mapping[str, Placement]  # by container name
    migration_states: Mapping[str, str]  # migration id -> record state (absent: unknown)


def swept(ledger: HostReservations, seen: Seen) -> tuple[HostReservations, tuple[str, ...]]:
    """The ledger after one sweep, and why each dropped reservation went."""
    kept: list[Reservation] = []
    dropped: list[str] = []
    for r in ledger.entries:
        why = _done(r, ledger.host, seen)
        if why is not None:
            dropped.append(f"{r.container} on {ledger.host}: {why}")
        elif r.sweeps + 1 >= RESERVATION_SWEEPS:
            dropped.append(
                f"{r.container} on {ledger.host}: not placed there after {r.sweeps + 1} sweeps"
            )
        else:
            kept.append(r.model_copy(update={"sweeps": r.sweeps + 1}))
    return ledger.model_copy(update={"entries": tuple(kept)}), tuple(dropped)


def _done(r: Reservation, host: str, seen: Seen) -> str | None:
    placement = seen.placements.get(r.container)
    if r.purpose == "move" and r.migration_id is not None:
        state = seen.migration_states.get(r.migration_id)
        if state in TERMINAL:
            return f"migration {r.migration_id} {state}"
        return None
    if placement is not None and placement.host == host:
        return "its placement counts it now"
    return None
