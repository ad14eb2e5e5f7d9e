"""The cleanup worker's work: removing containers, and the source's leftovers after a
move. No NATS here."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v2.results import CleanSourceResult
from services.errors import RuntimeFailure
from services.runtime import ledger
from services.runtime.containers import HostContainers
from services.runtime.source_cleanup import SourceCleanup
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun, placement_of

SOURCE_CRIU_EXIT_S = 30.0
PAGE_SIZE = 4096


@dataclass(frozen=True)
class Cleanup:
    """The cleanup role on this host, holding what its steps need."""

    cleanup: SourceCleanup
    containers: HostContainers

    def steps(self) -> dict[str, StepHandler]:
        return {"clean_source": self.clean_source}

    async def remove_container(self, cmd: RemoveContainer) -> ContainerRemoved:
        """Stop the container and remove its process, network, files, address and record."""
        return await self.containers.remove(cmd)

    async def clean_source(self, run: StepRun, progress: Progress) -> StepOutcome:
        """After the commit: no images, bundle, netns, veth or runc state stays on the source
        (for post-copy: the stopped copy it kept as the way back goes too)."""
        result: CleanSourceResult | None = None
        if run.strategy == "post-copy":
            rc, pages = await self.cleanup.pages_served(run.migration_id, SOURCE_CRIU_EXIT_S)
            result = CleanSourceResult(source_criu_rc=rc, pages_served=pages)
        volumes = self.cleanup.local_volumes(run.container)
        if volumes:
            # The volumes are the container's data: removed here only once the placement
            # itself says they belong to the destination (the step's turn is the first sign).
            placement = await placement_of(run, self.containers.placements)
            if placement.host != run.destination:
                raise RuntimeFailure(
                    f"{run.container} is placed on {placement.host}, not {run.destination}:"
                    " its volumes stay on the source"
                )
        removed = await self.cleanup.clean_source(run.container, run.migration_id, volumes)
        ledger.source_done(run.record)
        also = f" (volumes {', '.join(removed)} removed)" if removed else ""
        await progress(f"nothing of {run.container} is left on {run.source}{also}", None, None)
        # Post-copy's pages moved after the commit; they count once the source says so.
        served = result.pages_served if result else 0
        return StepOutcome(result, bytes_moved=served * PAGE_SIZE)
