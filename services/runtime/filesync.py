"""The container's files on their way to the destination (the transfer worker's part).

While the container runs, its overlay upper dir goes ahead whole (the pre-sync); after the
freeze, the images, the bundle config and only what changed since the pre-sync follow.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.config import HostConfig
from services.runtime import spans, transfer
from services.runtime.containers import HostContainers
from services.runtime.paths import MigrationPaths
from services.runtime.proc import kill_working_on
from services.runtime.spans import tracer


def _peer(link: transfer.Link) -> dict[str, str]:
    """Who the bytes went to, for the trace (never the key)."""
    return {"ferry.peer": f"{link.address}:{link.port}", "ferry.peer_host": link.peer}


@dataclass(frozen=True)
class TransferOptions:
    """How this migration's own transfers go: a rate cap, compression, a progress hook."""

    limit_bps: int | None = None
    compress: bool = False
    on_progress: transfer.Progress | None = None


class FileSync:
    """Sends this host's containers' files to the host they move to."""

    def __init__(self, config: HostConfig, containers: HostContainers) -> None:
        self.config = config
        self.containers = containers

    def paths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths.of(self.config.state_dir, migration_id)

    async def presync_files(
        self, name: str, migration_id: str, link: transfer.Link, options: TransferOptions
    ) -> transfer.Sent:
        """While the container still runs: its overlay upper dir, whole, to the destination.
        The manifest taken first is what the delta after the freeze is computed against."""
        paths, cpaths = self.paths(migration_id), self.containers.paths(name)
        paths.root.mkdir(parents=True, exist_ok=True)
        with tracer.start_as_current_span("fs.presync", attributes=_peer(link)) as span:
            sent, since = await transfer.push_presync(
                link, migration_id, cpaths.root, "upper", self.config.state_dir / "tmp",
                limit_bps=options.limit_bps, compress=options.compress,
                on_progress=options.on_progress,
            )  # fmt: skip
            spans.transferred(span, sent)
        paths.presync_manifest.write_text(json.dumps(since))
        return sent

    def forget_presync(self, migration_id: str) -> bool:
        """Remove what a pre-sync left on the source, unless a dump happened here (then
        resuming the source owns that directory). Returns whether anything went."""
        paths = self.paths(migration_id)
        if paths.dumped or not paths.root.exists():
            return False
        kill_working_on(paths.root)
        shutil.rmtree(paths.root, ignore_errors=True)
        return True

    async def push_bundle(
        self,
        name: str,
        migration_id: str,
        link: transfer.Link,
        options: TransferOptions,
        damage: Callable[[], bool] | None = None,
    ) -> list[transfer.Sent]:
        """After the freeze: images and bundle config, then what changed in the upper dir
        since the pre-sync (all of it if no pre-sync happened). `damage` (tests only) says
        when to corrupt the bytes on the way."""
        paths, cpaths = self.paths(migration_id), self.containers.paths(name)
        members = [
            transfer.Member(paths.root, "images"),
        ]
        scratch = self.config.state_dir / "tmp"
        with tracer.start_as_current_span("fs.sync", attributes=_peer(link)) as span:
            images = transfer.push(
                link, migration_id, "bundle", members, scratch, damage,
                limit_bps=options.limit_bps, compress=options.compress,
                on_progress=options.on_progress,
            )  # fmt: skip
            files: Awaitable[transfer.Sent]
            if paths.presync_manifest.exists():
                since = json.loads(paths.presync_manifest.read_text())
                files = transfer.push_delta(
                    link, migration_id, cpaths.root, "upper", since, scratch,
                    limit_bps=options.limit_bps, compress=options.compress,
                    on_progress=options.on_progress,
                )  # fmt: skip
            else:
                files = _first(
                    transfer.push_presync(
                        link, migration_id, cpaths.root, "upper", scratch,
                        limit_bps=options.limit_bps, compress=options.compress,
                        on_progress=options.on_progress,
                    )
                )  # fmt: skip
            if options.limit_bps:  # one after the other, or the two would share no limit
                sent = [await images, await files]
            else:  # side by side: this runs inside the freeze window
                sent = list(await asyncio.gather(images, files))
            spans.transferred(span, *sent)
        return sent


async def _first(pair: Awaitable[tuple[transfer.Sent, object]]) -> transfer.Sent:
    return (await pair)[0]
