"""Source-side handlers. No NATS here: they take a message and the host, return a message."""

from __future__ import annotations

from schemas.v1.containers import ContainerList, ListContainers
from services.runtime.containers import HostContainers


async def list_containers(cmd: ListContainers, containers: HostContainers) -> ContainerList:
    """The containers this host's runc knows, with their state."""
    return await containers.list()
