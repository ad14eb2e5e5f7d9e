"""The transfer worker's work: the container's files ahead of the freeze, then images and
the file delta after it. No NATS here."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.v2.results import PresyncResult, TransferResult
from services.faults import FaultPlan
from services.runtime.filesync import FileSync, TransferOptions
from services.saga.steps import Progress, StepHandler, StepOutcome, StepRun
from services.transfer_keys import KeyHolder


def _options(run: StepRun, progress: Progress, what: str) -> TransferOptions:
    async def on_progress(done: int, total: int) -> None:
        await progress(what, done, total)

    return TransferOptions(
        limit_bps=run.options.bandwidth_limit_bps,
        compress=run.options.compress,
        on_progress=on_progress,
        block_deltas=run.options.block_deltas,
    )


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes} bytes ({nbytes / max(seconds, 1e-6) / 2**20:.1f} MiB/s)"


@dataclass(frozen=True)
class Transfer:
    """The transfer role on this host, holding what its steps need."""

    files: FileSync
    keys: KeyHolder
    faults: FaultPlan

    def steps(self) -> dict[str, StepHandler]:
        return {
            "presync_files": self.presync_files,
            "transfer": self.transfer,
            "forget_presync": self.forget_presync,
        }

    async def presync_files(self, run: StepRun, progress: Progress) -> StepOutcome:
        """While the container still runs, its files go ahead of the freeze."""
        link = await self.keys.link_to(run.destination, run.migration_id)
        options = _options(run, progress, f"pre-syncing files to {link.address}")
        sent = await self.files.presync_files(run.container, run.migration_id, link, options)
        await progress(
            f"pre-synced {sent.entries} entries, {_rate(sent.bytes, sent.seconds)}",
            sent.bytes,
            sent.bytes,
        )
        result = PresyncResult(presync_bytes=sent.bytes, presync_ms=round(sent.seconds * 1000))
        return StepOutcome(result, bytes_moved=sent.bytes)

    async def transfer(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Images, bundle config and what changed in the files since the pre-sync,
        sha256-checked."""
        link = await self.keys.link_to(run.destination, run.migration_id)
        options = _options(run, progress, f"sending images and file changes to {link.address}")
        damage = self.faults.once(run.migration_id, "corrupt:transfer")
        sent = await self.files.push_bundle(run.container, run.migration_id, link, options, damage)
        total = sum(s.bytes for s in sent.all)
        seconds = sum(s.seconds for s in sent.all)
        changed = sum(s.entries for s in sent.all[1:])
        volume_bytes = sum(s.bytes for s in sent.volumes)
        said = f"sent {_rate(total, seconds)}; {changed} changed file(s)"
        if sent.volumes:
            said += f", volumes {volume_bytes} bytes in {sent.volume_seconds * 1000:.0f} ms"
        await progress(said, total, total)
        result = TransferResult(
            transfer_bytes=total,
            transfer_ms=round(seconds * 1000),
            transfer_sha256=sent.images.sha256,
            delta_entries=changed,
            volume_bytes=volume_bytes,
            volume_ms=round(sent.volume_seconds * 1000),
        )
        return StepOutcome(result, bytes_moved=total)

    async def forget_presync(self, run: StepRun, progress: Progress) -> StepOutcome:
        """Compensation: no file of a pre-sync that no dump followed stays on the source."""
        if self.files.forget_presync(run.migration_id):
            await progress(f"removed the pre-sync of {run.container} on {run.source}", None, None)
        return StepOutcome()
