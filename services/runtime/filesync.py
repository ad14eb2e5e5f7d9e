"""The container's files on their way to the destination (the transfer worker's part).

While the container runs, its overlay upper dir and its volumes go ahead whole (the
pre-sync); after the freeze, the images, the bundle config and only what changed since the
pre-sync follow, the volumes' deltas beside the upper dir's (their share of the freeze is
in the trace, span `fs.sync.volumes`, and in the transfer's result).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.config import HostConfig
from services.errors import RuntimeFailure
from services.runtime import container_logs, spans, transfer
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
    block_deltas: bool = True


@dataclass(frozen=True)
class BundleSent:
    """What went after the freeze: images, the upper dir's delta, each volume's delta."""

    images: transfer.Sent
    files: transfer.Sent
    volumes: list[transfer.Sent] = field(default_factory=list)
    volume_seconds: float = 0.0  # wall time of the volumes' part (they go side by side)

    @property
    def all(self) -> list[transfer.Sent]:
        return [self.images, self.files, *self.volumes]


class FileSync:
    """Sends this host's containers' files to the host they move to."""

    def __init__(self, config: HostConfig, containers: HostContainers) -> None:
        self.config = config
        self.containers = containers

    def paths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths.of(self.config.state_dir, migration_id)

    async def volume_names(self, name: str) -> list[str]:
        """The container's volumes, from its placement (the record, not this host's files)."""
        found = await self.containers.placements.get(name)
        if found is None:
            raise RuntimeFailure(f"the placement of {name} is missing", retryable=True)
        return [m.name for m in found[0].spec.volumes]

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
        paths.presync_signatures.write_text(json.dumps(sent.signatures))
        volumes = await self.volume_names(name)
        if not volumes:
            return sent
        with tracer.start_as_current_span(
            "fs.presync.volumes", attributes={**_peer(link), "ferry.volumes": volumes}
        ) as span:
            vsent, manifests = await transfer.push_volumes(
                link, migration_id, self.containers.volumes.root, volumes,
                self.config.state_dir / "tmp", limit_bps=options.limit_bps,
                compress=options.compress, on_progress=options.on_progress,
            )  # fmt: skip
            spans.transferred(span, vsent)
        paths.volumes_presync_manifest.write_text(json.dumps(manifests))
        paths.presync_signatures.write_text(json.dumps({**sent.signatures, **vsent.signatures}))
        return transfer.Sent(
            bytes=sent.bytes + vsent.bytes,
            sha256=sent.sha256,
            seconds=sent.seconds + vsent.seconds,
            raw_bytes=sent.raw_bytes + vsent.raw_bytes,
            encoding=sent.encoding,
            entries=sent.entries + vsent.entries,
        )

    def signatures(self, migration_id: str, options: TransferOptions) -> dict[str, list[str]]:
        """What the destination said it holds of the pre-synced large files (none: whole)."""
        if not options.block_deltas:
            return {}
        path = self.paths(migration_id).presync_signatures
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

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
    ) -> BundleSent:
        """After the freeze: images and bundle config, then what changed in the upper dir
        and the volumes since the pre-sync (all of it if no pre-sync happened). `damage`
        (tests only) says when to corrupt the bytes on the way."""
        paths, cpaths = self.paths(migration_id), self.containers.paths(name)
        members = [transfer.Member(paths.root, "images")]
        if cpaths.log.is_dir():  # its stdout and stderr so far, once the old logger wrote all
            await container_logs.drained(cpaths.log)
            members.append(transfer.Member(cpaths.root, container_logs.LOG_DIR))
        scratch = self.config.state_dir / "tmp"
        signatures = self.signatures(migration_id, options)  # read once, inside the freeze
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
                    on_progress=options.on_progress, signatures=signatures,
                )  # fmt: skip
            else:
                files = _first(
                    transfer.push_presync(
                        link, migration_id, cpaths.root, "upper", scratch,
                        limit_bps=options.limit_bps, compress=options.compress,
                        on_progress=options.on_progress,
                    )
                )  # fmt: skip
            volumes = self._volume_deltas(name, migration_id, link, options, signatures)
            if options.limit_bps:  # one after the other, or they would share no limit
                first, second = await images, await files
                vsent, vseconds = await volumes
                sent = BundleSent(first, second, vsent, vseconds)
            else:  # side by side: this runs inside the freeze window
                both, (vsent, vseconds) = await asyncio.gather(
                    asyncio.gather(images, files), volumes
                )
                sent = BundleSent(both[0], both[1], vsent, vseconds)
            spans.transferred(span, *sent.all)
        return sent

    async def _volume_deltas(
        self,
        name: str,
        migration_id: str,
        link: transfer.Link,
        options: TransferOptions,
        signatures: transfer.Signatures,
    ) -> tuple[list[transfer.Sent], float]:
        """Each volume's changes since its pre-sync (whole, if none happened). Which volumes:
        the pre-sync's (no bus read inside the freeze), else the placement's."""
        manifest_path = self.paths(migration_id).volumes_presync_manifest
        since = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        volumes = list(since) if since is not None else await self.volume_names(name)
        if not volumes:
            return [], 0.0
        base, scratch = self.containers.volumes.root, self.config.state_dir / "tmp"
        with tracer.start_as_current_span(
            "fs.sync.volumes", attributes={**_peer(link), "ferry.volumes": volumes}
        ) as span:
            started = time.monotonic()
            if since is not None:
                sent = []
                for volume in volumes:
                    delta = transfer.push_delta(
                        link, migration_id, base, volume, since[volume], scratch,
                        limit_bps=options.limit_bps, compress=options.compress, into="volumes",
                        signatures=signatures,
                    )  # fmt: skip
                    sent.append(await delta)
            else:
                whole, _ = await transfer.push_volumes(
                    link, migration_id, base, volumes, scratch,
                    limit_bps=options.limit_bps, compress=options.compress,
                )  # fmt: skip
                sent = [whole]
            seconds = time.monotonic() - started
            spans.transferred(span, *sent)
            span.set_attribute("ferry.volume_ms", round(seconds * 1000))
        return sent, seconds


async def _first(pair: Awaitable[tuple[transfer.Sent, object]]) -> transfer.Sent:
    return (await pair)[0]
