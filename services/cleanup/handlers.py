"""Cleanup handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v1.migrations import StepCommand
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome, strategy_of

SOURCE_CRIU_EXIT_S = 30.0
PAGE_SIZE = 4096


async def remove_container(cmd: RemoveContainer, containers: HostContainers) -> ContainerRemoved:
    """Stop the container and remove its process, network, files, address and record."""
    return await containers.remove(cmd)


async def clean_source(cmd: StepCommand, progress: Progress, host: MigrationHost) -> StepOutcome:
    """After the commit: no images, bundle, netns, veth or runc state stays on the source
    (for post-copy: the stopped copy it kept as the way back goes too)."""
    served: dict[str, int] = {}
    if strategy_of(cmd) == "post-copy":
        served = await host.source_pages_served(cmd.migration_id, SOURCE_CRIU_EXIT_S)
    await host.clean_source(cmd.container, cmd.migration_id)
    await progress(f"nothing of {cmd.container} is left on {cmd.source}", None, None)
    # Post-copy's pages moved after the commit; they count once the source says so.
    return StepOutcome(facts=dict(served), bytes_moved=served.get("pages_written", 0) * PAGE_SIZE)
