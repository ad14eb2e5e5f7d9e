"""Transfer handlers. No NATS here."""

from __future__ import annotations

from schemas.v1.migrations import StepCommand
from services import faults
from services.runtime.migration import MigrationHost
from services.steps import Progress, StepOutcome
from services.stores import PeerDirectory


async def transfer(
    cmd: StepCommand, progress: Progress, host: MigrationHost, peers: PeerDirectory, port: int
) -> StepOutcome:
    """Images, bundle config and filesystem changes go to the destination, sha256-checked."""
    address = await peers.address_of(cmd.destination)
    await progress(f"sending images and filesystem changes to {address}", None, None)
    damage = faults.OneShot(faults.fires(cmd, "corrupt:transfer", host.config.state_dir))
    sent = await host.push_bundle(cmd.container, cmd.migration_id, address, port, damage)
    rate = sent.bytes / sent.seconds if sent.seconds > 0 else 0.0
    await progress(f"sent {sent.bytes} bytes ({rate / 2**20:.1f} MiB/s)", sent.bytes, sent.bytes)
    return StepOutcome(
        facts={
            "transfer_bytes": sent.bytes,
            "transfer_ms": round(sent.seconds * 1000),
            "transfer_sha256": sent.sha256,
        },
        bytes_moved=sent.bytes,
    )
