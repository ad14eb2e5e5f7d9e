"""After the bus's store is lost: what the placements should be and how each interrupted
migration ends, judged only from the hosts' own ledgers and what their runc runs. No I/O.

The rules (issue 13):
- a container that runs on exactly one host is placed there;
- on two or more, on the one a committed migration of it names as destination, else it is
  a conflict: nothing is written for it, an operator decides;
- a migration the loss caught (its record is gone from the bus, no ledger says it ended)
  ends by the same evidence: no host's ledger says committed → compensate (resume the
  source, discard the destination), the placement names the source; the destination's
  ledger says committed → roll forward (open the network, clean the source), the
  placement names the destination. Either way the placement is written locked by the
  migration, so the saga finds it as it left it and unlocks it when it ends;
- a migration whose record is still on the bus is judged by that record, not by the
  ledgers' copies (they may lag behind it: a host writes down only what its own workers
  saw): if it is unfinished, its container's placement is written locked by it, on the
  destination once a commit is known, else on the source, and the saga goes on by itself;
- one container has at most one unfinished migration: an older one a ledger kept is over
  once a newer one of the same container is live on the bus;
- a host that did not answer may run anything: nothing is written while one is silent;
- a placement still on the bus is never overwritten; if it differs, that is reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.v1.containers import Placement
from schemas.v2.ledger import LedgerMigration, LedgerReport
from schemas.v2.migrations import MigrationRecord
from workflows.definitions import DEFINITIONS
from workflows.saga import Decision, SagaDefinition, cancelled, pending_commands, roll_forward

RUNNING_STATES = frozenset({"running", "paused", "created", "creating"})
FINISHED_STATES = frozenset({"completed", "rolled_back", "failed"})

PlacementAction = Literal["create", "exists", "differs"]
MigrationAction = Literal["roll_back", "roll_forward", "on_bus", "ended"]


def _progress(record: MigrationRecord) -> tuple[int, int, int, bool, float]:
    """How far a record has got: records only grow (steps appended, steps finishing,
    attempts counted), so this orders two hosts' copies without comparing their clocks;
    the time breaks a tie."""
    finished_steps = sum(1 for s in record.steps if s.status != "running")
    attempts = sum(s.attempts for s in record.steps)
    return (
        len(record.steps),
        finished_steps,
        attempts,
        record.state in FINISHED_STATES,
        record.updated_at,
    )


def newest(a: MigrationRecord, b: MigrationRecord) -> MigrationRecord:
    """The copy of the same migration's record that has got further."""
    return b if _progress(b) > _progress(a) else a


@dataclass(frozen=True)
class PlannedPlacement:
    placement: Placement
    action: PlacementAction
    reason: str


@dataclass(frozen=True)
class PlannedMigration:
    record: MigrationRecord  # the newest copy a ledger holds
    action: MigrationAction
    reason: str
    decision: Decision | None = None  # what to write and publish, for roll_back/roll_forward


@dataclass(frozen=True)
class Conflict:
    name: str
    reason: str


@dataclass
class Plan:
    answered: tuple[str, ...]
    silent: dict[str, str]  # host -> why it gave no ledger
    placements: list[PlannedPlacement] = field(default_factory=list)
    migrations: list[PlannedMigration] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def blocked(self) -> str | None:
        """Why nothing may be written, if so."""
        if not self.silent:
            return None
        hosts = ", ".join(f"{h} ({why})" for h, why in sorted(self.silent.items()))
        return f"no ledger from {hosts}: what it runs is unknown, so nothing is written"

    def as_json(self) -> dict[str, Any]:
        return {
            "answered": list(self.answered),
            "silent": dict(self.silent),
            "blocked": self.blocked,
            "placements": [
                {
                    "name": p.placement.name,
                    "host": p.placement.host,
                    "ip": p.placement.ip,
                    "state": p.placement.state,
                    "migration_id": p.placement.migration_id,
                    "action": p.action,
                    "reason": p.reason,
                }
                for p in self.placements
            ],
            "migrations": [
                {
                    "id": m.record.id,
                    "container": m.record.container,
                    "source": m.record.source,
                    "destination": m.record.destination,
                    "action": m.action,
                    "reason": m.reason,
                    "next": [c.step for c in m.decision.commands] if m.decision else [],
                }
                for m in self.migrations
            ],
            "conflicts": [{"name": c.name, "reason": c.reason} for c in self.conflicts],
        }


@dataclass
class _Migration:
    """One migration merged from every ledger that took part in it."""

    record: MigrationRecord
    committed: bool  # the destination's commit CAS succeeded, or the source cleaned up after it
    hosts: set[str]


def _merge_migrations(reports: Sequence[LedgerReport]) -> dict[str, _Migration]:
    merged: dict[str, _Migration] = {}
    for report in reports:
        for entry in report.migrations:
            committed = _says_committed(entry)
            found = merged.get(entry.id)
            if found is None:
                merged[entry.id] = _Migration(entry.record, committed, {report.host})
                continue
            found.record = newest(found.record, entry.record)
            found.committed = found.committed or committed
            found.hosts.add(report.host)
    return merged


def _with_the_bus(
    merged: dict[str, _Migration], records_on_bus: Mapping[str, MigrationRecord]
) -> dict[str, _Migration]:
    """The bus's record replaces the ledgers' copies: it is the truth while it exists, and a
    copy may be stale (an end the watchdog wrote, or one no worker of that host saw). A live
    record no ledger mentions yet still locks its container."""
    for migration_id, record in records_on_bus.items():
        found = merged.get(migration_id)
        if found is None:
            merged[migration_id] = _Migration(record, record.committed, set())
            continue
        found.record = record
        found.committed = found.committed or record.committed
    return merged


def _says_committed(entry: LedgerMigration) -> bool:
    return (entry.role == "destination" and entry.committed) or (
        entry.role == "source" and entry.source_done
    )


def _end_decision(
    defn: SagaDefinition, migration: _Migration, now: float
) -> tuple[MigrationAction, Decision | None, str]:
    record = migration.record
    if migration.committed:
        if record.committed:
            decision = Decision(record, pending_commands(record))
        else:
            decision = roll_forward(
                defn, record, "the destination's ledger says its commit succeeded", now
            )
            if not decision.changed:
                return "roll_forward", None, "committed, but the record copy cannot go on"
        return "roll_forward", decision, f"{record.destination}'s ledger says committed"
    reason = "no host's ledger says committed; the bus's store was lost"
    return "roll_back", cancelled(defn, record, reason, now), reason


def _spec(
    name: str, owner: str, ledgers: Mapping[str, Mapping[str, Placement]]
) -> Placement | None:
    """The container's placement as its owner's ledger has it, else any host's."""
    if name in ledgers.get(owner, {}):
        return ledgers[owner][name]
    for held in ledgers.values():
        if name in held:
            return held[name]
    return None


def plan(
    reports: Sequence[LedgerReport],
    silent: Mapping[str, str],
    on_bus: Mapping[str, Placement],
    records_on_bus: Mapping[str, MigrationRecord],
    now: float,
    definitions: Mapping[str, SagaDefinition] = DEFINITIONS,
) -> Plan:
    """What reconcile would write, from the answered hosts' ledgers and runc lists, and the
    migration records the bus still has (by id)."""
    result = Plan(answered=tuple(r.host for r in reports), silent=dict(silent))
    ledgers = {r.host: {p.name: p for p in r.containers} for r in reports}
    running: dict[str, list[str]] = {}
    for report in reports:
        for c in report.runtime:
            if c.state in RUNNING_STATES:
                running.setdefault(c.name, []).append(report.host)

    # Migrations first: one the loss caught decides where its container belongs.
    # container -> (its host now, the migration, whether that host is the committed destination)
    owner_by_migration: dict[str, tuple[str, str, bool]] = {}
    committed_to: dict[str, list[tuple[MigrationRecord, str]]] = {}
    merged = _with_the_bus(_merge_migrations(reports), records_on_bus)
    caught: list[tuple[str, _Migration]] = []
    contested: set[str] = set()  # two unfinished migrations: nothing is written for it
    for migration_id, migration in sorted(merged.items()):
        record = migration.record
        if migration.committed:
            committed_to.setdefault(record.container, []).append((record, record.destination))
        if record.state in FINISHED_STATES:
            result.migrations.append(PlannedMigration(record, "ended", f"it {record.state}"))
            continue
        if migration_id not in records_on_bus:
            caught.append((migration_id, migration))
            continue
        # The saga goes on by itself; its container's placement stays locked by it.
        if record.container in owner_by_migration:
            other = owner_by_migration[record.container][1]
            contested.add(record.container)
            result.conflicts.append(
                Conflict(record.container, f"migrations {other} and {migration_id} both unfinished")
            )
            continue
        owner = record.destination if migration.committed else record.source
        owner_by_migration[record.container] = (owner, migration_id, migration.committed)
        result.migrations.append(
            PlannedMigration(record, "on_bus", "its record is on the bus; the saga goes on")
        )
    live_on_bus = {c: m for c, (_, m, _) in owner_by_migration.items()}
    for migration_id, migration in caught:
        record = migration.record
        if record.container in live_on_bus:
            # A newer migration could lock the container only after this one let it go.
            reason = f"migration {live_on_bus[record.container]} of it is live on the bus"
            result.migrations.append(PlannedMigration(record, "ended", reason))
            continue
        if record.container in owner_by_migration:
            other = owner_by_migration[record.container][1]
            contested.add(record.container)
            result.conflicts.append(
                Conflict(record.container, f"migrations {other} and {migration_id} both unfinished")
            )
            continue
        action, decision, reason = _end_decision(definitions[record.chosen], migration, now)
        result.migrations.append(PlannedMigration(record, action, reason, decision))
        if decision is None:
            result.conflicts.append(Conflict(record.container, reason))
            continue
        forward = action == "roll_forward"
        owner = record.destination if forward else record.source
        owner_by_migration[record.container] = (owner, migration_id, forward)

    names = set(running) | {n for held in ledgers.values() for n in held}
    names |= set(owner_by_migration)
    for name in sorted(names - contested):
        placement, why = _placement_of(name, running, ledgers, owner_by_migration, committed_to)
        if placement is None:
            result.conflicts.append(Conflict(name, why))
            continue
        existing = on_bus.get(name)
        if existing is None:
            result.placements.append(PlannedPlacement(placement, "create", why))
        elif (existing.host, existing.ip) == (placement.host, placement.ip):
            result.placements.append(PlannedPlacement(existing, "exists", "already on the bus"))
        else:
            result.placements.append(
                PlannedPlacement(
                    placement,
                    "differs",
                    f"the bus places it on {existing.host} at {existing.ip}; left as it is",
                )
            )
    return result


def _placement_of(
    name: str,
    running: Mapping[str, list[str]],
    ledgers: Mapping[str, Mapping[str, Placement]],
    owner_by_migration: Mapping[str, tuple[str, str, bool]],
    committed_to: Mapping[str, list[tuple[MigrationRecord, str]]],
) -> tuple[Placement | None, str]:
    """The placement to write for one container and why, or None and why not."""
    hosts = sorted(running.get(name, []))
    if name in owner_by_migration:
        owner, migration_id, committed = owner_by_migration[name]
        if committed and owner not in hosts:
            # Rolling forward onto a copy that does not run would leave none: an operator
            # decides (the source may still hold its way back).
            return None, f"migration {migration_id} committed it to {owner}, which does not run it"
        spec = _spec(name, owner, ledgers)
        if spec is None:
            return None, f"migration {migration_id} owns it but no ledger has its spec"
        locked = spec.model_copy(
            update={"host": owner, "state": "migrating", "migration_id": migration_id}
        )
        return locked, f"migration {migration_id} is unfinished; it belongs to {owner} now"
    if not hosts:
        where = ", ".join(sorted(h for h, held in ledgers.items() if name in held))
        return None, f"in the ledger of {where} but running nowhere; nothing written"
    if len(hosts) == 1:
        owner, why = hosts[0], f"runs on {hosts[0]} only"
    else:
        named = [(r, d) for r, d in committed_to.get(name, []) if d in hosts]
        if not named:
            return None, f"runs on {', '.join(hosts)} and no committed migration names one"
        record, owner = max(named, key=lambda rd: _progress(rd[0]))
        why = f"runs on {', '.join(hosts)}; migration {record.id} committed it to {owner}"
    spec = _spec(name, owner, ledgers)
    if spec is None:
        return None, f"runs on {', '.join(hosts)} but no ledger has its spec"
    return spec.model_copy(update={"host": owner, "state": "running", "migration_id": None}), why
