"""Container lifecycle on one host: create, list, remove — nothing left behind on failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.v1.containers import (
    MAX_LOG_LINES,
    ContainerCreated,
    ContainerList,
    ContainerLogs,
    ContainerRemoved,
    ContainerSpec,
    CreateContainer,
    HostLayer,
    LayerList,
    LayersPulled,
    LogLine,
    Placement,
    PullLayers,
    ReadLogs,
    RemoveContainer,
    RemoveVolume,
    RuntimeContainer,
    VolumeList,
    VolumeRemoved,
)
from services.config import HostConfig
from services.errors import Conflict, NotFound, RuntimeFailure
from services.retrying import transient
from services.runtime import bundle, container_logs, layers, ledger, netns, users
from services.runtime.runc import Runc
from services.runtime.volumes import HostVolumes
from services.stores import AddressPool, LayerSource, PlacementStore
from workflows.volumes import users_of

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ContainerPaths:
    """Where a container's pieces live on its host."""

    root: Path
    netns: Path

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def criu_config(self) -> Path:
        return self.root / "criu.conf"

    @property
    def log(self) -> Path:
        """Its stdout and stderr, as multilog writes them (services/runtime/container_logs.py)."""
        return self.root / container_logs.LOG_DIR


@dataclass(frozen=True)
class LayersReady:
    """A container's layers on this host, lowest first, and what it took to get them."""

    paths: tuple[Path, ...]
    fetched: tuple[str, ...]
    present: tuple[str, ...]
    bytes_fetched: int

    def facts(self) -> dict[str, int]:
        return {
            "layers_fetched": len(self.fetched),
            "layers_present": len(self.present),
            "layer_bytes_fetched": self.bytes_fetched,
        }

    def summary(self) -> str:
        fetched = f"{len(self.fetched)} fetched and verified ({self.bytes_fetched / 2**20:.1f} MiB)"
        return f"layers: {fetched}, {len(self.present)} already here"


class HostContainers:
    """The containers of the host this process runs on."""

    def __init__(
        self,
        config: HostConfig,
        placements: PlacementStore,
        addresses: AddressPool,
        layer_source: LayerSource,
    ) -> None:
        self.config = config
        self.runc = Runc(config.runc_root)
        self.placements = placements
        self.addresses = addresses
        self.layer_source = layer_source
        self.volumes = HostVolumes(config.volumes_dir)
        self._layer_locks: dict[str, asyncio.Lock] = {}

    def paths(self, name: str) -> ContainerPaths:
        return ContainerPaths(
            root=self.config.containers_dir / name, netns=self.config.netns_dir / name
        )

    async def create(self, cmd: CreateContainer) -> ContainerCreated:
        """Claim the name and an address fleet-wide, then build and start the container.

        Every step pushes its undo; a failure runs them in reverse, so a failed create
        leaves neither a record, an address, nor anything on disk or in the kernel.
        """
        existing = await self.placements.get(cmd.name)
        if existing is not None:
            raise Conflict(
                f"a container named {cmd.name!r} already exists on {existing[0].host}",
                field="name",
            )
        undo: list[Callable[[], Awaitable[None]]] = []
        try:
            ip = await self.addresses.allocate(cmd.name, self.config.pool_addresses())
            undo.append(lambda: self.addresses.release(ip, cmd.name))
            placement = Placement(
                name=cmd.name,
                host=self.config.host,
                ip=ip,
                mac=netns.mac_for(ip),
                spec=cmd.spec(user=None),  # "creating": the user is resolved below
            )
            revision = await self.placements.claim(placement)
            undo.append(lambda: self.placements.remove(cmd.name))
            undo.append(lambda: self.discard_local(cmd.name))
            ready = await self.ensure_layers(cmd.layers)
            paths = self.paths(cmd.name)
            await layers.mount_overlay(ready.paths, paths.upper, paths.work, paths.rootfs)
            if cmd.user is not None:
                user = await asyncio.to_thread(users.resolve, paths.rootfs, cmd.user)
                placement = placement.model_copy(update={"spec": cmd.spec(user=user)})
            if cmd.volumes:
                await self._refuse_used_volumes(cmd)
            for mount in cmd.volumes:
                if await asyncio.to_thread(self.volumes.create, mount, paths.rootfs):
                    # Undone last, once nothing of the container runs on it any more.
                    undo.insert(0, self._volume_undo(mount.name))
                    log.info("volume %s made for %s", mount.name, cmd.name)
            pid = await self._build_and_start(placement, ready.paths)
            await self.placements.update(
                placement.model_copy(update={"state": "running"}), revision
            )
            ledger.held(placement)  # this host's own record, for a store that gets lost
        except BaseException:
            for step in reversed(undo):
                try:
                    await step()
                except Exception:
                    log.exception("undo step failed while rolling back create of %s", cmd.name)
            raise
        log.info("container %s runs with pid %d at %s", cmd.name, pid, ip)
        return ContainerCreated(
            name=cmd.name, host=self.config.host, ip=ip, mac=placement.mac, pid=pid
        )

    async def _refuse_used_volumes(self, cmd: CreateContainer) -> None:
        """A volume serves one container: it moves with it. (Read from the placements,
        this one's own claim aside: a store that cannot be read refuses the create.)"""
        placed = await self.placements.all()
        for mount in sorted(cmd.volumes, key=lambda m: m.name):
            users = users_of(placed, mount.name, besides=cmd.name)
            if users:
                raise Conflict(
                    f"volume {mount.name!r} is in use by container {users[0].name}"
                    f" on {users[0].host}",
                    field="--volume",
                )

    def _volume_undo(self, name: str) -> Callable[[], Awaitable[None]]:
        async def remove() -> None:
            await asyncio.to_thread(self.volumes.remove, name)

        return remove

    async def logger_for(self, name: str) -> int:
        """A new logger for `name`'s stdout and stderr: the pipe's write end, to give runc
        (run or restore) and then close."""
        logger = await container_logs.start_logger(
            self.paths(name).log, self.config.log_file_bytes, self.config.log_files
        )
        return logger.fd

    async def ensure_layer(self, digest: str) -> int | None:
        """Make the layer present here, unpacked: fetched from the layer store and
        sha256-verified the first time this host needs it, then kept. Returns the bytes
        fetched, None when it was already here. One fetch per digest at a time, across
        this host's worker processes."""
        layers_dir = self.config.layers_dir
        if (layers_dir / digest).is_dir():
            return None
        lock = self._layer_locks.setdefault(digest, asyncio.Lock())
        async with lock, layers.layer_lock(layers_dir, digest):
            if (layers_dir / digest).is_dir():
                return None  # another task or worker fetched it while we waited
            size = await self._fetch_and_unpack(digest)
        log.info("layer %s fetched from the layer store (%d bytes), verified, unpacked",
                 digest[:12], size)  # fmt: skip
        return size

    @transient
    async def _fetch_and_unpack(self, digest: str) -> int:
        """One fetch; a layer whose sha256 does not match is refused (retryable)."""
        tar_path = self.config.layers_dir / f".{digest}.tar"
        try:
            await self.layer_source.fetch(digest, tar_path)
            size = tar_path.stat().st_size
            await asyncio.to_thread(layers.unpack_layer, tar_path, digest, self.config.layers_dir)
        finally:
            tar_path.unlink(missing_ok=True)
        return size

    async def ensure_layers(self, digests: Sequence[str]) -> LayersReady:
        """Every layer of a container present here, lowest first; the first failure
        (typed: a corrupted fetch is retryable, a missing layer is not) stops it."""
        sizes = {d: await self.ensure_layer(d) for d in digests}
        return LayersReady(
            paths=tuple(self.config.layers_dir / d for d in digests),
            fetched=tuple(d for d in digests if sizes[d] is not None),
            present=tuple(d for d in digests if sizes[d] is None),
            bytes_fetched=sum(size or 0 for size in sizes.values()),
        )

    async def pull_layers(self, cmd: PullLayers) -> LayersPulled:
        """Fetch, verify and unpack layers ahead of any container that needs them."""
        ready = await self.ensure_layers(cmd.layers)
        what = f"image {cmd.image}" if cmd.image else f"{len(cmd.layers)} layer(s)"
        log.info("pulled %s: %s", what, ready.summary())
        return LayersPulled(
            host=self.config.host,
            fetched=ready.fetched,
            present=ready.present,
            bytes_fetched=ready.bytes_fetched,
        )

    async def list_layers(self) -> LayerList:
        held = await asyncio.to_thread(layers.held_layers, self.config.layers_dir)
        return LayerList(
            host=self.config.host,
            layers=tuple(
                HostLayer(digest=h.digest, size_bytes=h.size_bytes, unpacked_at=h.unpacked_at)
                for h in held
            ),
        )

    def write_config(self, name: str, spec: ContainerSpec) -> Path:
        """`name`'s config.json on this host, made from its spec and this host's paths; the
        one way a bundle here gets one (creating a container, and restoring a moved one).
        Returns the bundle directory."""
        paths = self.paths(name)
        config = bundle.oci_config(
            spec,
            volume_sources={m.name: self.volumes.data(m.name) for m in spec.volumes},
            hostname=name,
            netns_path=paths.netns,
            cgroups_path=f"{self.config.cgroup_parent}/{name}",
            criu_config=bundle.ensure_criu_config(paths.criu_config, tls=self.config.tls),
        )
        paths.bundle.mkdir(parents=True, exist_ok=True)
        bundle.write_config(paths.bundle, config)
        return paths.bundle

    async def _build_and_start(self, placement: Placement, lowers: Sequence[Path]) -> int:
        name = placement.name
        paths = self.paths(name)
        await layers.mount_overlay(lowers, paths.upper, paths.work, paths.rootfs)
        network = netns.ContainerNetwork(
            netns_path=paths.netns,
            host_veth=netns.host_veth_name(name),
            ip=placement.ip,
            prefix_len=self.config.subnet.prefixlen,
            gateway=self.config.gateway,
            mac=placement.mac,
        )
        await netns.create(network, self.config.bridge)
        self.write_config(name, placement.spec)
        bundle.refuse_hooks(paths.bundle)
        stdio = await self.logger_for(name)
        try:
            await self.runc.run_detached(
                name, paths.bundle, paths.root / "runc.log", timeout=START_TIMEOUT_S, stdio=stdio
            )
        finally:
            os.close(stdio)
        state = await self.runc.state(name)
        if state is None or state.status != "running" or state.pid is None:
            status = state.status if state else "unknown to runc"
            raise RuntimeFailure(f"container {name} did not stay running (it is {status})")
        return state.pid

    def on_disk(self) -> set[str]:
        """Containers whose files (an upper dir) this host's disk holds."""
        if not self.config.containers_dir.is_dir():
            return set()
        return {d.name for d in self.config.containers_dir.iterdir() if (d / "upper").is_dir()}

    async def start_again(self, placement: Placement) -> int:
        """Start a container placed here from its files on this disk (its upper dir and
        volumes; its memory is gone) after a reboot wiped the runtime's state: what a
        reboot leaves half there (an overlay, a netns file) is made again. A volume that is
        missing is never made anew: the start is refused. Returns the new pid."""
        name, paths = placement.name, self.paths(placement.name)
        if await self.runc.state(name) is not None:
            raise Conflict(f"runc already knows {name} on {self.config.host}")
        if not paths.upper.is_dir():
            raise RuntimeFailure(f"{name}: no files on this host to start it from")
        missing = [m.name for m in placement.spec.volumes if not self.volumes.exists(m.name)]
        if missing:
            raise RuntimeFailure(f"{name}: volume(s) {', '.join(missing)} not on this host")
        ready = await self.ensure_layers(placement.layers)
        await layers.unmount(paths.rootfs)
        await netns.destroy(paths.netns, netns.host_veth_name(name))
        shutil.rmtree(paths.work, ignore_errors=True)
        pid = await self._build_and_start(placement, ready.paths)
        ledger.held(placement)
        log.info("container %s started again from its files, pid %d", name, pid)
        return pid

    async def discard_local(self, name: str) -> None:
        """Remove everything this host holds for `name`; harmless when parts are missing."""
        paths = self.paths(name)
        await self.runc.delete(name)
        await layers.unmount(paths.rootfs)
        await netns.destroy(paths.netns, netns.host_veth_name(name))
        await asyncio.to_thread(shutil.rmtree, paths.root, True)
        ledger.forgot(name)

    async def remove(self, cmd: RemoveContainer) -> ContainerRemoved:
        found = await self.placements.get(cmd.name)
        if found is None:
            raise NotFound(f"no container named {cmd.name!r}", field="name")
        placement, revision = found
        if placement.state == "migrating":
            raise Conflict(
                f"{cmd.name} is moving (migration {placement.migration_id}); remove it afterwards",
                field="NAME",
            )
        if placement.host != self.config.host:
            raise Conflict(f"{cmd.name!r} runs on {placement.host}, not {self.config.host}")
        with contextlib.suppress(Exception):
            await self.placements.update(
                placement.model_copy(update={"state": "removing"}), revision
            )
        await self.discard_local(cmd.name)
        await self.addresses.release(placement.ip, cmd.name)
        await self.placements.remove(cmd.name)
        log.info("container %s removed", cmd.name)
        return ContainerRemoved(name=cmd.name, host=self.config.host)

    async def list(self) -> ContainerList:
        states = await self.runc.list()
        return ContainerList(
            host=self.config.host,
            containers=tuple(
                RuntimeContainer(name=s.name, state=s.status, pid=s.pid) for s in states
            ),
        )

    async def list_volumes(self) -> VolumeList:
        held = await asyncio.to_thread(self.volumes.list)
        return VolumeList(host=self.config.host, volumes=tuple(held))

    def _local_users(self, volume: str) -> tuple[str, ...]:
        """Containers of this host whose config.json mounts `volume`."""
        if not self.config.containers_dir.is_dir():
            return ()
        return tuple(
            d.name
            for d in sorted(self.config.containers_dir.iterdir())
            if volume in bundle.volume_names(self.paths(d.name).bundle, self.config.volumes_dir)
        )

    async def remove_volume(self, cmd: RemoveVolume) -> VolumeRemoved:
        """Remove a volume no container uses: none placed anywhere names it (the placements
        read whole, or nothing is removed), and none here mounts it."""
        if not self.volumes.exists(cmd.name):
            raise NotFound(f"no volume named {cmd.name!r} on {self.config.host}", field="NAME")
        users = users_of(await self.placements.all(), cmd.name)
        if users:
            raise Conflict(
                f"volume {cmd.name!r} is in use by container {users[0].name} on {users[0].host}",
                field="NAME",
            )
        local = self._local_users(cmd.name)
        if local:
            raise Conflict(
                f"volume {cmd.name!r} is mounted by {local[0]} on {self.config.host}", field="NAME"
            )
        size = await asyncio.to_thread(self.volumes.remove, cmd.name)
        log.info("volume %s removed (%d bytes)", cmd.name, size)
        return VolumeRemoved(name=cmd.name, host=self.config.host, size_bytes=size)

    async def read_logs(self, cmd: ReadLogs) -> ContainerLogs:
        """`name`'s log as this host holds it; refused unless it runs here (by the record)."""
        found = await self.placements.get(cmd.name)
        if found is None:
            raise NotFound(f"no container named {cmd.name!r}", field="NAME")
        if found[0].host != self.config.host and not self.paths(cmd.name).log.is_dir():
            raise Conflict(f"{cmd.name!r} runs on {found[0].host}, not {self.config.host}")
        after = container_logs.Cursor.decode(cmd.after) if cmd.after else None
        lines, cursor = await asyncio.to_thread(
            container_logs.read, self.paths(cmd.name).log, tail=cmd.tail, after=after
        )
        lines = lines[-MAX_LOG_LINES:]
        return ContainerLogs(
            host=self.config.host,
            name=cmd.name,
            lines=tuple(LogLine(at=line.at, text=line.text) for line in lines),
            cursor=cursor.encode(),
        )
