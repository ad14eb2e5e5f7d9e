"""The cleanup worker's work: removing containers, and the source's leftovers after a
move. No NATS here."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.v1.containers import ContainerRemoved, RemoveContainer
from schemas.v2.results import CleanSourceResult
from services.runtime import ledger
from services.runtime.containers import HostContainers
from services.runtime.source_cleanup import SourceCleanup
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun

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
        await self.cleanup.clean_source(run.container, run.migration_id)
        ledger.source_done(run.record)
        await progress(f"nothing of {run.container} is left on {run.source}", None, None)
        # Post-copy's pages moved after the commit; they count once the source says so.
        served = result.pages_served if result else 0
        return StepOutcome(result, bytes_moved=served * PAGE_SIZE)
