"""What this host's containers use now, read from their cgroups for the heartbeat.

runc puts each container's cgroup at <cgroup_parent>/<name> (services/runtime/containers.py).
Under cgroup v2 that is one directory with memory.current and cpu.stat; under v1 (this
machine, and the lab's hosts, which share its /sys/fs/cgroup: they enter only a mount
namespace of their own) it is one directory per controller, memory.usage_in_bytes in the
memory one and cpuacct.usage (ns) in the cpuacct one. A measurement is for an operator and
the fleet's view, never a reason to stop beating: nothing here raises.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from schemas.v1.base import NAME_PATTERN
from schemas.v1.hosts import ContainerUsage, HostUsage

log = logging.getLogger("ferry.usage")

CGROUP_ROOT = Path("/sys/fs/cgroup")
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Hierarchies:
    """Where the containers' cgroups are: the host's cgroup parent in the memory and in the
    CPU-accounting hierarchy (one and the same directory under cgroup v2)."""

    memory: Path
    cpu: Path

    @classmethod
    def of(cls, cgroup_parent: str, root: Path = CGROUP_ROOT) -> Hierarchies:
        relative = cgroup_parent.strip("/")
        if (root / "cgroup.controllers").exists():  # v2: one unified hierarchy
            return cls(root / relative, root / relative)
        return cls(root / "memory" / relative, root / "cpuacct" / relative)

    def containers(self) -> list[str]:
        """The names of the child cgroups that may be containers' (named as one may be)."""
        try:
            children = list(self.memory.iterdir())
        except OSError:  # no container has run here yet, or not this layout
            return []
        return sorted(c.name for c in children if _NAME.match(c.name) and c.is_dir())


def memory_bytes(cgroup: Path) -> int:
    """memory.current (v2), or memory.usage_in_bytes (v1): both count the page cache."""
    try:
        return int((cgroup / "memory.current").read_text())
    except FileNotFoundError:
        return int((cgroup / "memory.usage_in_bytes").read_text())


def cpu_usec(cgroup: Path) -> int:
    """CPU time used so far: cpu.stat's usage_usec (v2), or cpuacct.usage in ns (v1)."""
    try:
        for line in (cgroup / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value)
    except FileNotFoundError:
        pass  # v1's cpuacct hierarchy has no cpu.stat (a co-mounted cpu one lacks usage_usec)
    return int((cgroup / "cpuacct.usage").read_text()) // 1000


def percent(used_usec: int, elapsed_s: float) -> float | None:
    """CPU use over an interval, 100 = one CPU busy; None when it cannot be said (no time
    passed, or the counter went back: a new cgroup under the same name)."""
    if elapsed_s <= 0 or used_usec < 0:
        return None
    return round(used_usec / (elapsed_s * 1e6) * 100, 1)


class UsageMeter:
    """Samples the containers' cgroups; keeps each one's previous sample for its CPU %."""

    def __init__(
        self,
        hierarchies: Hierarchies,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hierarchies = hierarchies
        self.clock = clock
        self._previous: dict[str, tuple[float, int]] = {}  # name: (when, cpu_usec)
        self._failed = False

    @classmethod
    def for_parent(cls, cgroup_parent: str) -> UsageMeter:
        return cls(Hierarchies.of(cgroup_parent))

    def sample(self) -> HostUsage | None:
        """Every container's use now; None (said once in the log) if it cannot be read."""
        try:
            usage = self._sample()
        except Exception as exc:  # a heartbeat goes out without it, never not at all
            if not self._failed:
                log.warning("container usage not measured: %r", exc)
            self._failed = True
            return None
        self._failed = False
        return usage

    def _sample(self) -> HostUsage:
        seen: dict[str, tuple[float, int]] = {}
        containers = []
        for name in self.hierarchies.containers():
            try:
                memory = memory_bytes(self.hierarchies.memory / name)
                used = cpu_usec(self.hierarchies.cpu / name)
            except (OSError, ValueError):  # it vanished between listing and reading
                continue
            now = self.clock()
            before = self._previous.get(name)
            cpu = percent(used - before[1], now - before[0]) if before else None
            seen[name] = (now, used)
            containers.append(
                ContainerUsage(name=name, memory_bytes=memory, cpu_usec=used, cpu_percent=cpu)
            )
        self._previous = seen  # the vanished ones are forgotten
        return HostUsage(
            memory_bytes=sum(c.memory_bytes for c in containers),
            cpu_percent=round(sum(c.cpu_percent or 0.0 for c in containers), 1),
            containers=tuple(containers),
        )
