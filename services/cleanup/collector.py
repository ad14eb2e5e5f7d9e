"""The leftover collector: removes what this host holds for no live migration or placement.

Fencing comes first: the placement record decides which host may run a container. A copy
running here while the placement names another host (and no live migration involves it)
is stopped. Only positive evidence counts — a record that says otherwise, or no record at
all for a while — never a failed lookup. No NATS here: the fleet's state comes through
protocols.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from services.runtime import netlock
from services.runtime.containers import HostContainers
from services.runtime.netns import destroy, host_veth_name
from services.runtime.paths import migrations_dir as migrations_dir_of
from services.runtime.proc import kill_working_on
from services.stores import PlacementStore

log = logging.getLogger("ferry.collector")

MIN_AGE_S = 60.0  # never touch what a step may be creating right now


class MigrationLookup(Protocol):
    async def is_live(self, migration_id: str) -> bool | None:
        """True while the saga runs, False once it ended, None if there is no record."""
        ...


@dataclass
class Collected:
    migrations: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    network_holds: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def any(self) -> bool:
        return bool(
            self.migrations or self.containers or self.netns or self.network_holds
            or self.addresses
        )  # fmt: skip


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


async def collect(
    containers: HostContainers,
    placements: PlacementStore,
    migrations: MigrationLookup,
    min_age: float = MIN_AGE_S,
) -> Collected:
    config = containers.config
    now = time.time()
    done = Collected()

    migrations_dir = migrations_dir_of(config.state_dir)
    for entry in sorted(migrations_dir.iterdir()) if migrations_dir.is_dir() else []:
        if _age(entry, now) < min_age or await migrations.is_live(entry.name):
            continue
        kill_working_on(entry)
        shutil.rmtree(entry, ignore_errors=True)
        done.migrations.append(entry.name)

    known = {s.name for s in await containers.runc.list()}
    if config.containers_dir.is_dir():
        known |= {p.name for p in config.containers_dir.iterdir()}
    for name in sorted(known):
        found = await placements.get(name)
        if found is not None:
            placement = found[0]
            if placement.migration_id and await migrations.is_live(placement.migration_id):
                continue  # a move is under way: its saga owns both copies
            if placement.host == config.host:
                # It runs here and nothing is moving it: no hold or CRIU lock may stay on
                # its network (a left-over chain would cut it off from every client).
                netns_path = config.netns_dir / name
                if netns_path.exists() and await netlock.is_held(netns_path):
                    await netlock.release(netns_path)
                    await netlock.remove_criu_lock(netns_path)
                    done.network_holds.append(name)
                continue
        elif _age(config.containers_dir / name, now) < min_age:
            continue  # being created right now: its placement is about to appear
        where = found[0].host if found else "nowhere"
        log.warning("%s is placed on %s: removing this host's copy", name, where)
        await containers.discard_local(name)
        done.containers.append(name)

    if config.netns_dir.is_dir():
        for ns in sorted(config.netns_dir.iterdir()):
            if (config.containers_dir / ns.name).exists() or _age(ns, now) < min_age:
                continue
            await destroy(ns, host_veth_name(ns.name))
            done.netns.append(ns.name)
    if done.any():
        log.info("collected leftovers: %s", done)
    return done


class AddressLedger(Protocol):
    """Datacenter address reservations, each with the container that owns it."""

    async def owners(self) -> dict[str, str]: ...

    async def release(self, ip: str, owner: str) -> None: ...


async def collect_addresses(
    ledger: AddressLedger, placements: PlacementStore, suspects: set[str]
) -> tuple[list[str], set[str]]:
    """Release reservations whose owner has no placement — confirmed on two sweeps in a row,
    so a create that reserved its address a moment ago is never robbed."""
    released: list[str] = []
    still: set[str] = set()
    for ip, owner in (await ledger.owners()).items():
        if await placements.get(owner) is not None:
            continue
        if ip in suspects:
            await ledger.release(ip, owner)
            released.append(ip)
        else:
            still.add(ip)
    return released, still
