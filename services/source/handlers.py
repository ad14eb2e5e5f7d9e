"""The source worker's work: pre-flight, pre-copy rounds, the dump, and the way back.
No NATS here: a handler takes a step run (command + record) and returns its result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from schemas.v1.containers import ContainerList, ListContainers
from schemas.v1.migrations import HostCheck, HostCheckReply
from schemas.v2.results import PrecopyResult, ResumeResult
from services import preflight as dry_run
from services.errors import RuntimeFailure
from services.link_handover import LinkGiver
from services.runtime.containers import HostContainers
from services.runtime.source_side import Handover, SourceSide
from services.runtime.transfer import Link
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun, placement_of
from services.stores import PeerDirectory, PlacementStore
from services.transfer_keys import KeyHolder
from workflows.precopy import IterationStats, PrecopyPlan, decide

PAGE_SIZE = 4096

# (destination host, migration id, it-N or images, parent dir) -> "address:port"
RoundPageServer = Callable[[str, str, str, "str | None"], Awaitable[str]]


@dataclass(frozen=True)
class Source:
    """The source role on this host, holding what its steps need."""

    side: SourceSide
    containers: HostContainers
    placements: PlacementStore
    peers: PeerDirectory
    page_server_for: RoundPageServer
    keys: KeyHolder
    links: LinkGiver

    def steps(self) -> dict[str, StepHandler]:
        return {
            "preflight": self.preflight,
            "precopy_rounds": self.precopy_rounds,
            "dump": self.dump,
            "resume_source": self.resume_source,
        }

    async def list_containers(self, cmd: ListContainers) -> ContainerList:
        """The containers this host's runc knows, with their state."""
        return await self.containers.list()

    async def check(self, cmd: HostCheck) -> HostCheckReply:
        """Dry run of the source's part."""
        checks, memory = await self.side.check(cmd.container)
        return dry_run.reply(self.side.config.host, checks, memory)

    async def preflight(self, run: StepRun, progress: Progress) -> StepOutcome:
        """CRIU works here, the container runs here, and the destination is a known host."""
        await self.peers.address_of(run.destination)
        return StepOutcome(await self.side.preflight(run.container))

    async def _handover(self, run: StepRun) -> Handover:
        """What the freeze calls to hand the container's link to the destination; the key
        it signs with is fetched now, before anything is frozen."""
        grant = await self.links.prepared(run.destination, run.migration_id)

        async def hand_over() -> bool:
            return await self.links.hand_over(run.destination, grant)

        return hand_over

    async def dump(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Freeze and dump; the pages stream into the destination's page server, or, for
        post-copy, wait on this host for the destination to pull them."""
        handover = await self._handover(run)
        if run.strategy == "post-copy":
            await progress(
                f"freezing {run.container}; its pages stay here to be pulled", None, None
            )
            destination = await self.peers.address_of(run.destination)
            lazy = await self.side.dump_lazy(
                run.container, run.migration_id, destination, handover=handover
            )
            await progress(
                f"dumped in {lazy.dump_ms} ms; pages served from {lazy.lazy_pages}", None, None
            )
            return StepOutcome(lazy)
        if run.strategy == "pre-copy":
            rounds = run.needs(run.results.precopy_rounds, "precopy_rounds")
            page_server, parent = rounds.page_server, f"../it-{rounds.precopy_rounds}"
        else:
            prepared = run.needs(run.results.prepare_destination, "prepare_destination")
            page_server, parent = run.needs(prepared.page_server, "a page server"), None
        await progress(f"freezing {run.container}; pages stream to {page_server}", None, None)
        result = await self.side.dump(
            run.container, run.migration_id, page_server, parent=parent, handover=handover
        )
        pages = result.pages_written
        await progress(f"dumped {pages} pages", pages * PAGE_SIZE, pages * PAGE_SIZE)
        return StepOutcome(result, bytes_moved=pages * PAGE_SIZE)

    async def precopy_rounds(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Pre-copy: rounds of pre-dumps while the container runs, until what is still
        dirty fits the downtime budget at the measured bandwidth (or a round cap hits).
        Ends by asking the destination for the final dump's page server, chained to the
        last round."""
        plan = PrecopyPlan(downtime_budget_ms=run.options.downtime_budget_ms)
        history: list[IterationStats] = []
        sent = 0
        while True:
            n = len(history) + 1
            parent = f"../it-{n - 1}" if n > 1 else None
            address = await self.page_server_for(
                run.destination, run.migration_id, f"it-{n}", parent
            )
            stats = await self.side.pre_dump(run.container, run.migration_id, n, address)
            history.append(IterationStats.from_criu(stats))
            sent += history[-1].dirty_bytes
            decision = decide(history, plan)
            left = decision.remaining_bytes or 0
            await progress(f"round {n}: {decision.reason}", sent, sent + left)
            if decision.final:
                break
        final = await self.page_server_for(
            run.destination, run.migration_id, "images", f"../it-{n}"
        )
        result = PrecopyResult(
            page_server=final,
            precopy_rounds=n,
            precopy_reason=decision.reason,
            precopy_expected_downtime_ms=decision.expected_downtime_ms,
        )
        return StepOutcome(result, bytes_moved=sent)

    async def resume_source(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Compensation: the container runs on the source again, with its memory intact."""
        placement = await placement_of(run, self.placements)
        if placement.host != run.source:
            # The container belongs to another host: a copy started here would run twice.
            raise RuntimeFailure(
                f"refusing to resume {run.container} on {run.source}:"
                f" the placement names {placement.host}"
            )

        async def link() -> Link:  # asked for only if the pages must come back
            return await self.keys.link_to(run.destination, run.migration_id)

        how = await self.side.resume(placement, run.migration_id, link)
        await progress(f"{run.container} runs on {run.source} again ({how})", None, None)
        return StepOutcome(ResumeResult(resumed=how))
