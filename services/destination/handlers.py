"""Destination-side handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.containers import ContainerCreated, CreateContainer
from services.runtime.containers import HostContainers


async def create_container(cmd: CreateContainer, containers: HostContainers) -> ContainerCreated:
    """A new container arrives on this host: fetch its layer, give it an address, start it."""
    return await containers.create(cmd)
