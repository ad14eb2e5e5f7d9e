"""Destination-side handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.containers import ContainerCreated, CreateContainer
from schemas.v1.migrations import StepCommand
from services import faults
from services.errors import RuntimeFailure
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome, fact_float, fact_ports, placement_of
from services.stores import PlacementStore


async def create_container(cmd: CreateContainer, containers: HostContainers) -> ContainerCreated:
    """A new container arrives on this host: fetch its layer, give it an address, start it."""
    return await containers.create(cmd)


async def prepare_destination(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    """Layer present, network namespace built with its link down, page server listening."""
    placement = await placement_of(cmd, placements)
    facts = await host.prepare(placement, cmd.migration_id)
    await progress(f"page server listening on {facts['page_server']}", None, None)
    return StepOutcome(facts=dict(facts))


async def restore(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    """Restore behind a held network: it runs, but no client can reach it yet."""
    placement = await placement_of(cmd, placements)
    facts = await host.restore(
        placement,
        cmd.migration_id,
        fact_float(cmd, "frozen_at"),
        sabotage="restore" in faults.carried(cmd),
    )
    await progress(f"{cmd.container} restored, network held until the commit", None, None)
    return StepOutcome(facts=dict(facts))


async def verify(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    placement = await placement_of(cmd, placements)
    return StepOutcome(facts=dict(await host.verify(placement, fact_ports(cmd))))


async def commit(cmd: StepCommand, progress: Progress, placements: PlacementStore) -> StepOutcome:
    """The point of no return: the placement moves to this host by compare-and-set."""
    found = await placements.get(cmd.container)
    if found is None:
        raise RuntimeFailure(f"placement of {cmd.container} vanished; refusing to commit")
    placement, revision = found
    if placement.migration_id != cmd.migration_id:
        raise RuntimeFailure(
            f"{cmd.container} is no longer locked by this migration; refusing to commit"
        )
    if placement.host == cmd.destination:
        return StepOutcome()  # committed by an earlier delivery
    if placement.host != cmd.source:
        raise RuntimeFailure(f"{cmd.container} is placed on {placement.host}; refusing to commit")
    await placements.update(placement.model_copy(update={"host": cmd.destination}), revision)
    await progress(f"committed: {cmd.container} belongs to {cmd.destination}", None, None)
    return StepOutcome()


async def open_network(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    placement = await placement_of(cmd, placements)
    announced = await host.open_network(placement, cmd.migration_id)
    await progress(
        f"{cmd.container} serves clients at {placement.ip};"
        f" announced {', '.join(announced) or 'nothing'} (gratuitous ARP, IPv6 NA)",
        None,
        None,
    )
    return StepOutcome()


async def stop_destination(
    cmd: StepCommand, progress: Progress, host: MigrationHost
) -> StepOutcome:
    """Compensation: the restored copy stops (before the commit only)."""
    await host.stop_restored(cmd.container, cmd.migration_id)
    return StepOutcome()


async def discard_destination(
    cmd: StepCommand, progress: Progress, host: MigrationHost
) -> StepOutcome:
    """Compensation: nothing of the incoming container stays on this host."""
    await host.discard(cmd.container, cmd.migration_id)
    return StepOutcome()
