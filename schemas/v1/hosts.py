"""What hosts and their workers say about themselves on the bus."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.v1.base import Message, Part
from schemas.v1.types import IPStr
from schemas.v1.versions import HostVersions

WorkerRole = Literal["source", "transfer", "destination", "cleanup"]
WORKER_ROLES: tuple[WorkerRole, ...] = ("source", "transfer", "destination", "cleanup")


class WorkerStatus(Part):
    """One supervised worker as its host agent sees it."""

    role: WorkerRole
    pid: int | None = None
    restarts: int = Field(default=0, ge=0)


class ContainerUsage(Part):
    """One container's use of its host, from its cgroup."""

    name: str
    memory_bytes: int = Field(ge=0, description="memory.current (cgroup v1: memory.usage_in_bytes)")
    cpu_usec: int = Field(ge=0, description="cpu.stat usage_usec (cgroup v1: cpuacct.usage / 1000)")
    cpu_percent: float | None = Field(
        default=None, description="over the last interval; 100 = one CPU"
    )


class HostUsage(Part):
    """What the host's containers use now (measured; the scheduler counts declared sizes)."""

    memory_bytes: int = Field(ge=0)
    cpu_percent: float = Field(ge=0)
    containers: tuple[ContainerUsage, ...] = ()


class HostHeartbeat(Message):
    """Published by a host's agent every second; the key expires when the agent stops."""

    host: str
    address: IPStr
    agent_pid: int
    workers: tuple[WorkerStatus, ...] = ()
    sent_at: float
    usage: HostUsage | None = Field(default=None, description="absent: not measured")


class WorkerHeartbeat(Message):
    """Published by each worker once it is subscribed, then every second."""

    host: str
    role: WorkerRole
    pid: int
    sent_at: float
    health: tuple[str, ...] = Field(
        default=(), description="what the worker wants an operator to see; empty when all is well"
    )


class DeadDeclaration(Part):
    """An operator's word that a host and everything it held are gone for good: the only
    evidence that ends a way back waiting for that host (`ferry hosts declare-dead`)."""

    reason: str = Field(min_length=1)
    declared_at: float
    forced: bool = Field(
        default=False, description="declared while the host's agent still sent heartbeats"
    )


class HostCapacity(Part):
    """What an operator declared a host may give containers; None: not declared."""

    memory_mib: int | None = Field(default=None, gt=0)
    cpus: float | None = Field(default=None, gt=0)


class CpuFacts(Part):
    """The CPU a host's processes start on: a process restored on a CPU without the features
    it started with dies with SIGILL, so a destination is checked against its source's."""

    model: str = ""
    flags: tuple[str, ...] = Field(default=(), description="/proc/cpuinfo flags, sorted")
    criu_image: str | None = Field(
        default=None, description="base64 of `criu cpuinfo dump`'s cpuinfo.img"
    )
    missing: str = Field(default="", description="why the image is absent")


class HostRegistration(Message):
    """A host that joined the fleet; kept after it goes down, so "down" differs from "unknown"."""

    host: str
    address: IPStr
    registered_at: float
    features: tuple[str, ...] = Field(
        default=(), description="migration features this host supports (lazy_pages, ...)"
    )
    missing: dict[str, str] = Field(default_factory=dict, description="features it lacks, and why")
    zone: str = Field(default="", description="the failure domain it is in; empty: not said")
    region: str = Field(default="", description="the region it is in; empty: not said")
    cloud: str = Field(default="", description="the cloud or site it is in; empty: not said")
    labels: dict[str, str] = Field(default_factory=dict, description="its operator's labels")
    capacity: HostCapacity = Field(default_factory=HostCapacity, description="declared capacity")
    declared_dead: DeadDeclaration | None = Field(
        default=None, description="set by an operator who declared the host dead; absent: not"
    )
    versions: HostVersions | None = Field(
        default=None, description="what it runs; absent: an agent older than announcements"
    )
    cpu: CpuFacts | None = Field(default=None, description="absent: an agent older than this")
