"""Destination-side handlers. No NATS here."""

from __future__ import annotations

import time

from schemas.v1.containers import (
    ContainerCreated,
    CreateContainer,
    LayerList,
    LayersPulled,
    ListLayers,
    PullLayers,
)
from schemas.v1.migrations import PageServerStarted, StartPageServer, StepCommand
from services import faults
from services.errors import RuntimeFailure
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import (
    Progress,
    StepOutcome,
    fact_float,
    fact_ports,
    fact_str,
    placement_of,
    strategy_of,
)
from services.stores import PlacementStore

DRAIN_TIMEOUT_S = 840.0  # inside the step's 900 s


async def create_container(cmd: CreateContainer, containers: HostContainers) -> ContainerCreated:
    """A new container arrives on this host: fetch its layers, give it an address, start it."""
    return await containers.create(cmd)


async def list_layers(cmd: ListLayers, containers: HostContainers) -> LayerList:
    """Which layers this host holds verified and unpacked."""
    return await containers.list_layers()


async def pull_layers(cmd: PullLayers, containers: HostContainers) -> LayersPulled:
    """Fetch, verify and unpack an image's layers now, before any container needs them."""
    return await containers.pull_layers(cmd)


async def prepare_destination(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    """Layers present, network namespace built with its link down, page server listening."""
    placement = await placement_of(cmd, placements)
    strategy = strategy_of(cmd)
    facts = await host.prepare(placement, cmd.migration_id, page_server=strategy == "stop-and-copy")
    fetched = int(facts.get("layers_fetched", 0))
    if fetched:
        mib = int(facts.get("layer_bytes_fetched", 0)) / 2**20
        await progress(
            f"{fetched} of {len(placement.layers)} layer(s) were missing here: fetched from the"
            f" layer store once ({mib:.1f} MiB) and verified",
            None,
            None,
        )
    else:
        await progress(f"all {len(placement.layers)} layer(s) already here", None, None)
    if strategy == "post-copy":
        await progress("network namespace ready; pages will be pulled from the source", None, None)
    elif strategy == "pre-copy":
        await progress("network namespace ready; a page server starts for each round", None, None)
    else:
        await progress(f"page server listening on {facts['page_server']}", None, None)
    return StepOutcome(facts=dict(facts))


async def restore(
    cmd: StepCommand, progress: Progress, host: MigrationHost, placements: PlacementStore
) -> StepOutcome:
    """Restore behind a held network: it runs, but no client can reach it yet."""
    placement = await placement_of(cmd, placements)
    lazy_from = fact_str(cmd, "lazy_pages") if strategy_of(cmd) == "post-copy" else None
    facts = await host.restore(
        placement,
        cmd.migration_id,
        fact_float(cmd, "frozen_at"),
        lazy_from=lazy_from,
        sabotage="restore" in faults.carried(cmd),
        daemon_dies="lazy-pages-dies" in faults.carried(cmd),
    )
    pulled = f"; its pages come from {lazy_from} as it touches them" if lazy_from else ""
    await progress(f"{cmd.container} restored, network held until the commit{pulled}", None, None)
    return StepOutcome(facts=dict(facts))


async def drain_pages(cmd: StepCommand, progress: Progress, host: MigrationHost) -> StepOutcome:
    """Post-copy, after the commit: every page has arrived and the daemon exited 0."""
    await progress("pulling the pages not touched yet from the source", None, None)
    facts = await host.drain_pages(cmd.migration_id, timeout=DRAIN_TIMEOUT_S)
    if facts:
        await progress(f"all pages arrived after {facts['drain_ms']} ms", None, None)
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
    # From the freeze to an open network: what a client waits at the least (two hosts'
    # clocks are compared here; fine within NTP's error on real machines).
    frozen_at = fact_float(cmd, "frozen_at")
    gap = round((time.time() - frozen_at) * 1000) if frozen_at else 0
    return StepOutcome(facts={"frozen_to_open_ms": gap})


async def uncommit(cmd: StepCommand, progress: Progress, placements: PlacementStore) -> StepOutcome:
    """Post-copy fallback: the placement goes back to the source, by compare-and-set, once
    the destination's copy has stopped."""
    found = await placements.get(cmd.container)
    if found is None:
        raise RuntimeFailure(f"placement of {cmd.container} vanished; cannot hand it back")
    placement, revision = found
    if placement.migration_id != cmd.migration_id:
        raise RuntimeFailure(f"{cmd.container} is no longer locked by this migration")
    if placement.host == cmd.destination:
        await placements.update(placement.model_copy(update={"host": cmd.source}), revision)
    await progress(f"{cmd.container} belongs to {cmd.source} again", None, None)
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


async def start_page_server(cmd: StartPageServer, host: MigrationHost) -> PageServerStarted:
    """A page server for one pre-copy round (asked for by the source between rounds)."""
    address = await host.start_round_page_server(cmd.migration_id, cmd.images, cmd.parent)
    return PageServerStarted(address=address)
