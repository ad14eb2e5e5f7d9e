"""Creating, listing and removing containers on a host."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas.v1.base import HOST_PATTERN, NAME_PATTERN, Message, Part

ContainerNameStr = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
HostNameStr = Annotated[str, StringConstraints(pattern=HOST_PATTERN)]
LayerDigest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class CreateContainer(Message):
    """Start a new container on the host that receives this request."""

    name: ContainerNameStr
    layer: LayerDigest = Field(description="sha256 of the rootfs tar in the layers object store")
    args: tuple[str, ...] = Field(min_length=1, description="the command and its arguments")
    memory_mib: int | None = Field(default=None, ge=4, le=65536)
    env: tuple[str, ...] = ()


class Placement(Message):
    """Where a container runs; the fleet-wide truth, changed only by compare-and-set."""

    name: ContainerNameStr
    host: HostNameStr
    ip: str
    mac: str
    layer: LayerDigest
    args: tuple[str, ...]
    memory_mib: int | None = None
    state: Literal["creating", "running", "migrating", "removing"] = "creating"
    migration_id: str | None = None


class ContainerCreated(Message):
    """Reply: the container's process runs."""

    name: str
    host: str
    ip: str
    mac: str
    pid: int


class RemoveContainer(Message):
    """Stop and remove a container and everything the host holds for it."""

    name: ContainerNameStr


class ContainerRemoved(Message):
    """Reply: nothing of the container is left on the host."""

    name: str
    host: str


class ListContainers(Message):
    """Ask a host which containers its runtime knows."""


class RuntimeContainer(Part):
    """One container as the host's runc reports it."""

    name: str
    state: str
    pid: int | None = None


class ContainerList(Message):
    """Reply to ListContainers."""

    host: str
    containers: tuple[RuntimeContainer, ...]
