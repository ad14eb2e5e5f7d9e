"""Source-side handlers. No NATS here: they take a message and the host, return a result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from schemas.v1.containers import ContainerList, ListContainers
from schemas.v1.migrations import StepCommand
from services.runtime.containers import HostContainers
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome, fact_float, fact_str, placement_of, strategy_of
from services.stores import PeerDirectory, PlacementStore
from workflows.precopy import IterationStats, PrecopyPlan, decide

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
    """Freeze and dump; the pages stream into the destination's page server, or, for
    post-copy, wait on this host for the destination to pull them."""
    if strategy_of(cmd) == "post-copy":
        await progress(f"freezing {cmd.container}; its pages stay here to be pulled", None, None)
        lazy = await host.dump_lazy(cmd.container, cmd.migration_id)
        await progress(
            f"dumped in {lazy['dump_ms']} ms; pages served from {lazy['lazy_pages']}", None, None
        )
        return StepOutcome(facts=dict(lazy))
    page_server = fact_str(cmd, "page_server")
    rounds = cmd.facts.get("precopy_rounds")
    parent = f"../it-{rounds}" if strategy_of(cmd) == "pre-copy" and rounds else None
    await progress(f"freezing {cmd.container}; pages stream to {page_server}", None, None)
    facts = await host.dump(cmd.container, cmd.migration_id, page_server, parent=parent)
    pages = int(facts.get("pages_written", 0))
    await progress(f"dumped {pages} pages", pages * PAGE_SIZE, pages * PAGE_SIZE)
    return StepOutcome(facts=dict(facts), bytes_moved=pages * PAGE_SIZE)


# (destination host, migration id, it-N or images, parent dir) -> "address:port"
RoundPageServer = Callable[[str, str, str, "str | None"], Awaitable[str]]


async def precopy_rounds(
    cmd: StepCommand,
    progress: Progress,
    host: MigrationHost,
    page_server_for: RoundPageServer,
) -> StepOutcome:
    """Pre-copy: rounds of pre-dumps while the container runs, until what is still dirty
    fits the downtime budget at the measured bandwidth (or a round cap hits). Ends by
    asking the destination for the final dump's page server, chained to the last round."""
    plan = PrecopyPlan(downtime_budget_ms=int(fact_float(cmd, "downtime_budget_ms")) or 300)
    history: list[IterationStats] = []
    sent = 0
    while True:
        n = len(history) + 1
        images = f"it-{n}"
        parent = f"../it-{n - 1}" if n > 1 else None
        address = await page_server_for(cmd.destination, cmd.migration_id, images, parent)
        stats = await host.pre_dump(cmd.container, cmd.migration_id, n, address)
        history.append(IterationStats.from_criu(stats))
        sent += history[-1].dirty_bytes
        decision = decide(history, plan)
        left = decision.remaining_bytes or 0
        await progress(f"round {n}: {decision.reason}", sent, sent + left)
        if decision.final:
            break
    final = await page_server_for(cmd.destination, cmd.migration_id, "images", f"../it-{n}")
    return StepOutcome(
        facts={
            "page_server": final,
            "precopy_rounds": n,
            "precopy_reason": decision.reason,
            "precopy_expected_downtime_ms": decision.expected_downtime_ms,
        },
        bytes_moved=sent,
    )


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
