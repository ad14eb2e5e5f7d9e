"""The leftover collector: removes what this host holds for no live migration or placement —
but only on positive evidence (workflows/fencing.py decides; this module looks and acts).

A copy is removed only when the placement names another host on two sweeps some time apart
and that host says it runs the container; if it does not answer, the copy is frozen (`runc
pause`), never removed, and thawed once the evidence says it is the owner. A missing
placement, record or answer is unknown: kept, and alerted on. No NATS here: the fleet's state
comes through the Evidence protocol.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from schemas.v1.containers import Placement
from services import metrics
from services.errors import Conflict, FerryError
from services.runtime import netlock
from services.runtime.containers import HostContainers
from services.runtime.netns import destroy, host_veth_name
from services.runtime.paths import migrations_dir as migrations_dir_of
from services.runtime.proc import kill_working_on
from services.stores import PlacementStore
from workflows import fencing
from workflows.fencing import Action, Answer, DirAction, Lock, Memory, Record, Rules, Where

log = logging.getLogger("ferry.collector")

MIN_AGE_S = 60.0  # never touch a network namespace a step may be creating right now
FENCED = "fenced"  # marker in a container's directory: this host froze its copy
HEALTH_ITEMS = 8  # health lines a heartbeat carries at most

LOCK_OF: dict[Record, Lock] = {
    Record.LIVE: Lock.LIVE,
    Record.ENDED: Lock.ENDED,
    Record.MISSING: Lock.MISSING,
    Record.UNAVAILABLE: Lock.UNAVAILABLE,
}


@dataclass(frozen=True)
class PlacementSeen:
    where: Where
    placement: Placement | None = None
    revision: int = 0


class Evidence(Protocol):
    """What the fleet says, each answer already read as known or unknown."""

    async def placement(self, name: str) -> PlacementSeen: ...

    async def migration(self, migration_id: str) -> Record: ...

    async def ask(self, host: str, name: str) -> Answer:
        """The named host's word on whether it runs `name`; SILENT if it does not answer."""
        ...


@dataclass
class Collected:
    migrations: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    network_holds: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    thawed: list[str] = field(default_factory=list)
    locks_released: list[str] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    mass_orphaning: str | None = None

    def any(self) -> bool:
        return bool(
            self.migrations or self.containers or self.netns or self.network_holds
            or self.addresses or self.frozen or self.thawed or self.locks_released
        )  # fmt: skip

    def health(self) -> list[str]:
        """Short lines for `ferry hosts`: empty when all is well."""
        lines = [self.mass_orphaning] if self.mass_orphaning else []
        return (lines + self.alerts)[:HEALTH_ITEMS]


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass
class Collector:
    """One host's collector: its memory of earlier sweeps lives as long as the worker."""

    containers: HostContainers
    evidence: Evidence
    placements: PlacementStore
    rules: Rules
    min_age_s: float = MIN_AGE_S
    clock: Callable[[], float] = time.monotonic  # our own clock: never another host's
    memory: Memory = field(default_factory=Memory)
    sweeps: int = 0

    def _marker(self, name: str) -> Path:
        return self.containers.config.containers_dir / name / FENCED

    async def sweep(self) -> Collected:
        self.sweeps += 1
        done = Collected()
        await self._migrations(done)
        statuses = {s.name: s.status for s in await self.containers.runc.list()}
        await self._containers(statuses, done)
        await self._netns(statuses, done)
        if done.any():
            log.info("sweep %d collected: %s", self.sweeps, done)
        return done

    async def _migrations(self, done: Collected) -> None:
        now = self.clock()
        root = migrations_dir_of(self.containers.config.state_dir)
        entries = sorted(root.iterdir()) if root.is_dir() else []
        tracks = {}
        for entry in entries:
            record = await self.evidence.migration(entry.name)
            track = fencing.observe_dir(self.memory.migrations.get(entry.name), record, now)
            tracks[entry.name] = track
            decision = fencing.decide_dir(entry.name, record, track, now, self.rules)
            if decision.alert:
                log.error("migration dir %s: %s", entry.name, decision.reason)
                done.alerts.append(f"migration {entry.name}: {decision.reason}")
            if decision.action is DirAction.REMOVE:
                kill_working_on(entry)
                shutil.rmtree(entry, ignore_errors=True)
                done.migrations.append(entry.name)
        self.memory.migrations = fencing.remember(tracks, [e.name for e in entries])

    async def _sighting(self, name: str, seen: PlacementSeen) -> fencing.Sighting:
        lock = Lock.NONE
        if seen.placement is not None and seen.placement.migration_id:
            lock = LOCK_OF[await self.evidence.migration(seen.placement.migration_id)]
        return fencing.Sighting(
            name=name,
            where=seen.where,
            owner=seen.placement.host if seen.placement else None,
            revision=seen.revision,
            lock=lock,
            frozen=self._marker(name).exists(),
        )

    async def _containers(self, statuses: dict[str, str], done: Collected) -> None:
        config = self.containers.config
        now = self.clock()
        known = set(statuses)
        if config.containers_dir.is_dir():
            known |= {p.name for p in config.containers_dir.iterdir()}
        tracks = {}
        decisions = []
        placements: dict[str, PlacementSeen] = {}
        for name in sorted(known):
            placements[name] = seen = await self.evidence.placement(name)
            sighting = await self._sighting(name, seen)
            track = fencing.observe(self.memory.containers.get(name), sighting, now)
            tracks[name] = track
            decision = fencing.decide(sighting, track, now, self.rules)
            if decision.action is Action.ASK_OWNER and sighting.owner:
                answer = await self.evidence.ask(sighting.owner, name)
                decision = fencing.decide(replace(sighting, answer=answer), track, now, self.rules)
            decisions.append(decision)
        self.memory.containers = fencing.remember(tracks, known)

        unknown = sorted(n for n, seen in placements.items() if seen.where is Where.UNAVAILABLE)
        if unknown:  # the bus or the bucket is not answering: kept as they are, said once
            log.warning("placement unavailable for %s: kept as they are", ", ".join(unknown))
            done.alerts.append(f"placement unavailable for {len(unknown)} container(s): kept")
        plan = fencing.limit(decisions, self.rules)
        if plan.mass_orphaning:
            log.error("%s", plan.mass_orphaning)
            done.mass_orphaning = plan.mass_orphaning
            metrics.mass_orphaning(config.host)
        for decision in plan.decisions:
            if decision.alert:
                log.error("%s: %s", decision.name, decision.reason)
                done.alerts.append(f"{decision.name}: {decision.action}: {decision.reason}")
            try:
                await self._act(decision, placements[decision.name], statuses, done)
            except FerryError as exc:  # one container's trouble must not stop the sweep
                log.error("%s: %s failed: %s", decision.name, decision.action, exc.reason)
                done.alerts.append(f"{decision.name}: {decision.action} failed")
        metrics.frozen_orphans(config.host, sum(self._marker(n).exists() for n in known))

    async def _act(
        self,
        decision: fencing.Decision,
        seen: PlacementSeen,
        statuses: dict[str, str],
        done: Collected,
    ) -> None:
        name = decision.name
        status = statuses.get(name)
        if decision.action is Action.DISCARD:
            log.warning("%s: %s: removing this host's copy", name, decision.reason)
            await self.containers.discard_local(name)
            done.containers.append(name)
        elif decision.action is Action.FREEZE:
            if status == "running":
                await self.containers.runc.pause(name)
            if self._marker(name).parent.is_dir():
                self._marker(name).touch()
            done.frozen.append(name)
        elif decision.action is Action.THAW:
            if status == "paused":
                await self.containers.runc.resume(name)
            self._marker(name).unlink(missing_ok=True)
            done.thawed.append(name)
        elif decision.action is Action.RELEASE_LOCK and seen.placement is not None:
            if seen.placement.host != self.containers.config.host:
                return  # only the holder may write its placement: its own collector will
            unlocked = seen.placement.model_copy(
                update={"state": "running", "migration_id": None, "destination": None}
            )
            try:
                await self.placements.update(unlocked, seen.revision)
            except Conflict:
                return  # it changed meanwhile: the next sweeps look again
            log.warning("%s: %s: lock released", name, decision.reason)
            done.locks_released.append(name)
        elif decision.action is Action.RELEASE_HOLDS:
            # It runs here and nothing is moving it: no hold or CRIU lock may stay on its
            # network (a left-over chain would cut it off from every client).
            netns_path = self.containers.config.netns_dir / name
            if netns_path.exists() and await netlock.is_held(netns_path):
                await netlock.release(netns_path)
                await netlock.remove_criu_lock(netns_path)
                done.network_holds.append(name)

    async def _netns(self, statuses: dict[str, str], done: Collected) -> None:
        config = self.containers.config
        now = time.time()  # compared with a file's mtime, both this host's
        if not config.netns_dir.is_dir():
            return
        for ns in sorted(config.netns_dir.iterdir()):
            if ns.name in statuses or (config.containers_dir / ns.name).exists():
                continue  # a container still uses it
            if _age(ns, now) < self.min_age_s:
                continue
            await destroy(ns, host_veth_name(ns.name))
            done.netns.append(ns.name)


class AddressLedger(Protocol):
    """Datacenter address reservations, each with the container that owns it."""

    async def owners(self) -> dict[str, str]: ...

    async def release(self, ip: str, owner: str) -> None: ...


async def _nobody_runs(evidence: Evidence, hosts: Collection[str], name: str) -> bool:
    for host in hosts:
        if await evidence.ask(host, name) is not Answer.NOT_RUNNING:
            return False  # it runs there, or that host is silent: stop asking
    return True


async def collect_addresses(
    ledger: AddressLedger,
    evidence: Evidence,
    suspects: set[str],
    hosts: Collection[str],
    *,
    limit: int | None = None,
) -> tuple[list[str], set[str]]:
    """Release reservations nobody holds: the placement bucket answers "no such key" for the
    owner and every known host says it does not run it, on two sweeps in a row (so a create
    that reserved its address a moment ago is never robbed). A silent host keeps it; more
    suspects than `limit` at once (a lost placement store, not leaks) releases nothing."""
    owners = await ledger.owners()
    unplaced: set[str] = set()
    for ip, owner in owners.items():
        if (await evidence.placement(owner)).where is not Where.ABSENT:
            continue
        if hosts and await _nobody_runs(evidence, hosts, owner):
            unplaced.add(ip)
    if limit is not None and len(unplaced) > limit:
        log.error(
            "%d address reservations have no placement (limit %d): none released",
            len(unplaced),
            limit,
        )
        return [], unplaced
    released = sorted(unplaced & suspects)
    for ip in released:
        await ledger.release(ip, owners[ip])
    return released, unplaced - suspects
