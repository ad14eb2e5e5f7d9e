"""Transfer handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.migrations import StepCommand
from services import faults
from services.runtime.migration import MigrationHost, TransferOptions
from services.steps import Progress, StepOutcome
from services.stores import PeerDirectory


def _options(cmd: StepCommand, progress: Progress, what: str) -> TransferOptions:
    limit = cmd.facts.get("bandwidth_limit_bps")

    async def on_progress(done: int, total: int) -> None:
        await progress(what, done, total)

    return TransferOptions(
        limit_bps=int(limit) if isinstance(limit, int | float) and limit > 0 else None,
        compress=cmd.facts.get("compress") is True,
        on_progress=on_progress,
    )


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes} bytes ({nbytes / max(seconds, 1e-6) / 2**20:.1f} MiB/s)"


async def presync_files(
    cmd: StepCommand, progress: Progress, host: MigrationHost, peers: PeerDirectory, port: int
) -> StepOutcome:
    """While the container still runs, its files go ahead of the freeze."""
    address = await peers.address_of(cmd.destination)
    options = _options(cmd, progress, f"pre-syncing files to {address}")
    sent = await host.presync_files(cmd.container, cmd.migration_id, address, port, options)
    done = f"pre-synced {sent.entries} entries, {_rate(sent.bytes, sent.seconds)}"
    await progress(done, sent.bytes, sent.bytes)
    return StepOutcome(
        facts={"presync_bytes": sent.bytes, "presync_ms": round(sent.seconds * 1000)},
        bytes_moved=sent.bytes,
    )


async def transfer(
    cmd: StepCommand, progress: Progress, host: MigrationHost, peers: PeerDirectory, port: int
) -> StepOutcome:
    """Images, bundle config and what changed in the files since the pre-sync,
    sha256-checked."""
    address = await peers.address_of(cmd.destination)
    options = _options(cmd, progress, f"sending images and file changes to {address}")
    damage = faults.OneShot(faults.fires(cmd, "corrupt:transfer", host.config.state_dir))
    sent = await host.push_bundle(cmd.container, cmd.migration_id, address, port, options, damage)
    total = sum(s.bytes for s in sent)
    seconds = sum(s.seconds for s in sent)
    changed = sum(s.entries for s in sent[1:])
    await progress(f"sent {_rate(total, seconds)}; {changed} changed file(s)", total, total)
    return StepOutcome(
        facts={
            "transfer_bytes": total,
            "transfer_ms": round(seconds * 1000),
            "transfer_sha256": sent[0].sha256,
            "delta_entries": changed,
        },
        bytes_moved=total,
    )


async def forget_presync(cmd: StepCommand, progress: Progress, host: MigrationHost) -> StepOutcome:
    """Compensation: no file of a pre-sync that no dump followed stays on the source."""
    if host.forget_presync(cmd.migration_id):
        await progress(f"removed the pre-sync of {cmd.container} on {cmd.source}", None, None)
    return StepOutcome()
