"""Cleanup handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.containers import ContainerRemoved, RemoveContainer
from services.runtime.containers import HostContainers


async def remove_container(cmd: RemoveContainer, containers: HostContainers) -> ContainerRemoved:
    """Stop the container and remove its process, network, files, address and record."""
    return await containers.remove(cmd)
