"""Cleanup handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v1.migrations import StepCommand
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome


async def remove_container(cmd: RemoveContainer, containers: HostContainers) -> ContainerRemoved:
    """Stop the container and remove its process, network, files, address and record."""
    return await containers.remove(cmd)


async def clean_source(cmd: StepCommand, progress: Progress, host: MigrationHost) -> StepOutcome:
    """After the commit: no images, bundle, netns, veth or runc state stays on the source."""
    await host.clean_source(cmd.container, cmd.migration_id)
    await progress(f"nothing of {cmd.container} is left on {cmd.source}", None, None)
    return StepOutcome()
