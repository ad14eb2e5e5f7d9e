"""Source-side handlers. No NATS here: they take a message and the host, return a result."""

from __future__ import annotations

from schemas.v1.containers import ContainerList, ListContainers
from schemas.v1.migrations import StepCommand
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome, fact_str, placement_of
from services.stores import PeerDirectory, PlacementStore

PAGE_SIZE = 4096


async def list_containers(cmd: ListContainers, containers: HostContainers) -> ContainerList:
    """The containers this host's runc knows, with their state."""
    return await containers.list()


async def preflight(
    cmd: StepCommand, progress: Progress, host: MigrationHost, peers: PeerDirectory
) -> StepOutcome:
    """CRIU works here, the container runs here, and the destination is a known host."""
    await peers.address_of(cmd.destination)
    facts = await host.preflight(cmd.container)
    return StepOutcome(facts=dict(facts))


async def dump(cmd: StepCommand, progress: Progress, host: MigrationHost) -> StepOutcome:
    """Freeze and dump; the pages stream into the destination's page server."""
    page_server = fact_str(cmd, "page_server")
    await progress(f"freezing {cmd.container}; pages stream to {page_server}", None, None)
    facts = await host.dump(cmd.container, cmd.migration_id, page_server)
    pages = int(facts.get("pages_written", 0))
    await progress(f"dumped {pages} pages", pages * PAGE_SIZE, pages * PAGE_SIZE)
    return StepOutcome(facts=dict(facts), bytes_moved=pages * PAGE_SIZE)


async def resume_source(
    cmd: StepCommand,
    progress: Progress,
    host: MigrationHost,
    placements: PlacementStore,
    peers: PeerDirectory,
    transfer_port: int,
) -> StepOutcome:
    """Compensation: the container runs on the source again, with its memory intact."""
    placement = await placement_of(cmd, placements)
    peer = await peers.address_of(cmd.destination)
    how = await host.resume(placement, cmd.migration_id, peer, transfer_port)
    await progress(f"{cmd.container} runs on {cmd.source} again ({how})", None, None)
    return StepOutcome(facts={"resumed": how})
