"""The destination's part of a move: prepare, restore behind a held network, verify, open,
and — when the move does not stay — stop and discard.

Every operation is idempotent: a redelivered command finds its work done and says so.
No client reaches the restored container before the commit: its netns is held from
prepare until `open_network`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

from schemas.v1.containers import Placement
from schemas.v2.results import DrainResult, PrepareResult, RestoreResult, VerifyResult
from services.config import HostConfig
from services.errors import Conflict, RuntimeFailure
from services.faults import NO_FAULTS, FaultPlan
from services.runtime import (
    bundle,
    container_logs,
    criu,
    firewall,
    layers,
    lazy_pages,
    netlock,
    netns,
    packet_hold,
    precopy,
)
from services.runtime import paths as layout
from services.runtime.containers import ContainerPaths, HostContainers
from services.runtime.paths import MigrationPaths
from services.runtime.proc import kill_working_on
from services.runtime.restore import restore_container
from services.runtime.spans import tracer

PAGE_SERVER_EXIT_S = 30.0
DRAIN_POLL_S = 0.2
EXIT_CODE_GRACE_S = 3.0
VERIFY_CONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Opened:
    """The network opened: when (this host's clock), what was announced, what was held."""

    announced: list[str]
    opened_at: float
    hold: packet_hold.HoldStats | None


class DestinationSide:
    """This host as the destination of moves."""

    def __init__(
        self, config: HostConfig, containers: HostContainers, faults: FaultPlan = NO_FAULTS
    ) -> None:
        self.config = config
        self.containers = containers
        self.runc = containers.runc
        self.faults = faults

    def paths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths.of(self.config.state_dir, migration_id)

    def cpaths(self, name: str) -> ContainerPaths:
        return self.containers.paths(name)

    def _network(self, placement: Placement) -> netns.ContainerNetwork:
        return netns.ContainerNetwork(
            netns_path=self.cpaths(placement.name).netns,
            host_veth=netns.host_veth_name(placement.name),
            ip=placement.ip,
            prefix_len=self.config.subnet.prefixlen,
            gateway=self.config.gateway,
            mac=placement.mac,
        )

    async def check(self, name: str, needed_bytes: int) -> list[criu.Check]:
        """Dry run for the destination's part: CRIU works, the name is free, disk suffices."""
        results = [await criu.check_verdict()]
        state = await self.runc.state(name)
        results.append(
            (
                "no container of that name here",
                state is None,
                "free" if state is None else state.status,
            )
        )
        free = shutil.disk_usage(self.config.state_dir).free
        enough = free >= needed_bytes * 2
        results.append(
            (
                "disk space",
                enough,
                f"{free / 2**20:.0f} MiB free, about {needed_bytes / 2**20:.0f} MiB needed",
            )
        )
        return results

    async def prepare(
        self, placement: Placement, migration_id: str, *, page_server: bool, source_address: str
    ) -> PrepareResult:
        """Layers present, netns with the container's IP and MAC (link down), and for
        stop-and-copy a page server up (post-copy pulls its pages from the source instead)
        that only `source_address` may reach, over TLS where the host has certificates."""
        await criu.check()
        existing = await self.runc.state(placement.name)
        if existing is not None:
            raise Conflict(f"{placement.name} already exists on {self.config.host}")
        paths = self.paths(migration_id)
        volumes = [m.name for m in placement.spec.volumes]
        self.containers.volumes.refuse_existing(volumes, migration_id)
        # Layers are not part of what moves: a host lacking one fetches it from the layer
        # store once, sha256-verified, and keeps it for every later container and move.
        with tracer.start_as_current_span("layers.ensure") as span:
            ready = await self.containers.ensure_layers(placement.layers)
            for key, value in ready.facts().items():
                span.set_attribute(f"ferry.{key}", value)
        result = PrepareResult.model_validate(ready.facts())
        cpaths = self.cpaths(placement.name)
        if not cpaths.netns.exists():
            await netns.create(self._network(placement), self.config.bridge, link_up=False)
        # The hold goes on now, before any freeze: one less thing inside the freeze window.
        paths.root.mkdir(parents=True, exist_ok=True)
        with tracer.start_as_current_span("network.hold"):
            await netlock.hold(cpaths.netns)
            await packet_hold.start(cpaths.netns, paths.root)
        paths.held.touch()
        paths.peer.write_text(source_address)  # pre-copy's round page servers admit it too
        if not page_server:
            return result
        address = self.config.address
        if (
            paths.page_server_port.exists()
            and layout.pid_file(paths.images, layout.PAGE_SERVER).exists()
        ):
            port = int(paths.page_server_port.read_text())
        else:
            port = netns.free_port(address)
            with tracer.start_as_current_span(
                "criu.page_server", attributes={"ferry.listen": f"{address}:{port}"}
            ):
                firewall.admit_only(port, source_address, migration_id)
                await criu.start_page_server(paths.images, address, port, tls=self.config.tls)
            paths.page_server_port.write_text(str(port))
        return result.model_copy(update={"page_server": f"{address}:{port}"})

    async def take_link(self, placement: Placement, migration_id: str) -> bool:
        """The source is frozen and off the bridge: plug the incoming container's port in
        and announce its MAC here, so what its clients send from now on waits in its held
        netns instead of being lost. Nothing reaches its processes before the commit.
        Returns whether the announcement went out."""
        paths, cpaths = self.paths(migration_id), self.cpaths(placement.name)
        if not paths.held.exists():
            raise RuntimeFailure(f"{placement.name} is not held here: refusing to take its link")
        await netns.set_link(placement.name, up=True, check=True)
        return await netns.gratuitous_arp(cpaths.netns, placement.ip)

    async def start_round_page_server(
        self, migration_id: str, images: str, parent: str | None
    ) -> str:
        """Pre-copy: a page server for `images` (it-N, or the final `images`), chained to
        the previous round's directory."""
        target = self.paths(migration_id).root / images
        port_file = target / layout.PAGE_SERVER_PORT
        if port_file.exists() and criu.background_pid(target, layout.PAGE_SERVER) is not None:
            return f"{self.config.address}:{port_file.read_text()}"
        port = netns.free_port(self.config.address)
        argv = precopy.page_server_argv(
            target,
            self.config.address,
            port,
            status_fd=criu.STATUS_FD,
            parent=parent,
            tls=self.config.tls,
        )
        firewall.admit_only(port, self.paths(migration_id).peer.read_text(), migration_id)
        await criu.start_background(argv, target, layout.PAGE_SERVER)
        port_file.write_text(str(port))
        return f"{self.config.address}:{port}"

    async def restore(
        self,
        placement: Placement,
        migration_id: str,
        frozen_at: float,
        *,
        lazy_from: str | None = None,
    ) -> RestoreResult | None:
        """Restore behind a held network. With `lazy_from` (post-copy) the memory pages are
        not here yet: a lazy-pages daemon fetches them from the source as they are touched.
        None when an earlier delivery restored it already."""
        name = placement.name
        paths, cpaths = self.paths(migration_id), self.cpaths(name)
        # (Inside the freeze: runc is asked only when its state directory says it may know.)
        state = await self.runc.state(name) if self.runc.may_know(name) else None
        if state is not None and state.status == "running":
            return None
        rc = 0 if lazy_from else await criu.page_server_result(paths.images, PAGE_SERVER_EXIT_S)
        if rc != 0:
            raise RuntimeFailure(
                f"page server {'still waiting' if rc is None else f'exited {rc}'}:"
                " the pages did not all arrive",
                log_tail=criu.tail(paths.criu_log(layout.PAGE_SERVER)),
            )
        firewall.forget_peers(migration_id)  # every page server of the migration is done
        incoming = paths.incoming_bundle
        if not incoming.is_dir():
            raise RuntimeFailure("the bundle from the source has not arrived")
        paths.images.mkdir(parents=True, exist_ok=True)
        for item in incoming.joinpath("images").iterdir():
            target = paths.images / item.name
            if not target.exists():
                shutil.move(str(item), target)
        if not cpaths.upper.exists():
            synced = paths.incoming_presync / "upper"
            if not synced.is_dir():
                raise RuntimeFailure("the container's files from the source have not arrived")
            cpaths.root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(synced), cpaths.upper)
        arrived_log = incoming / container_logs.LOG_DIR
        if arrived_log.is_dir() and not cpaths.log.exists():  # the same log goes on here
            shutil.move(str(arrived_log), cpaths.log)
        for mount in placement.spec.volumes:  # marked as this move's until it is cleaned
            self.containers.volumes.adopt(
                mount.name, paths.incoming_volumes / mount.name, migration_id
            )
        shutil.rmtree(cpaths.work, ignore_errors=True)
        ready = await self.containers.ensure_layers(placement.layers)  # here since prepare
        await layers.mount_overlay(ready.paths, cpaths.upper, cpaths.work, cpaths.rootfs)
        # Its config is made here from the placement (the record), never taken from the
        # wire: a config.json that arrives in the incoming bundle is ignored.
        self.containers.write_config(name, placement.spec)
        bundle.ensure_criu_config(cpaths.criu_config, tls=self.config.tls)
        # Held (since prepare), then link up (at the latest now: the source normally hands
        # it over as it freezes), then restore: no packet reaches it before the commit.
        if not paths.held.exists():
            with tracer.start_as_current_span("network.hold"):
                await netlock.hold(cpaths.netns)
                await packet_hold.start(cpaths.netns, paths.root)
        await netns.set_link(name, up=True, check=True)
        if lazy_from:
            paths.lazy.write_text(lazy_from)
            if criu.background_pid(paths.images, layout.LAZY_PAGES) is None:
                host, port = lazy_from.rsplit(":", 1)
                with tracer.start_as_current_span(
                    "criu.lazy_pages", attributes={"ferry.peer": lazy_from}
                ):
                    await criu.start_lazy_pages(paths.images, host, int(port), tls=self.config.tls)
        if self.faults.carries(migration_id, "restore"):
            # Test-only fault: a damaged image makes the real CRIU restore fail (in post-copy,
            # after the lazy-pages daemon has connected to the source: CRIU's worst case).
            paths.inventory.write_bytes(b"ferry: injected fault\n")
        # Whether it stays running is verify's first check, the next step: not asked twice.
        stdio = await self.containers.logger_for(name)
        await restore_container(
            self.runc, name, paths, cpaths, stdio, lazy=bool(lazy_from), check_running=False
        )
        running_at = time.time()
        stats = criu.load_stats(paths.stats_restore)
        return RestoreResult(
            running_at=running_at,
            # Two hosts' clocks (the source froze it): a metric, never negative.
            freeze_ms=max(0, round((running_at - frozen_at) * 1000)) if frozen_at else 0,
            criu_restore_us=stats.get("restore_time", 0),
            pages_restored=stats.get("pages_restored", 0),
        )

    async def verify(self, placement: Placement, expected_ports: tuple[int, ...]) -> VerifyResult:
        """Alive, and listening again where it listened before — checked from inside,
        while the network is still held."""
        state = await self.runc.state(placement.name)
        if state is None or state.status != "running" or state.pid is None:
            raise RuntimeFailure(f"{placement.name} is not running after restore")
        ports = netlock.listening_ports(state.pid)
        missing = sorted(set(expected_ports) - ports)
        if missing:
            raise RuntimeFailure(f"{placement.name} no longer listens on {missing}")
        netns_path = self.cpaths(placement.name).netns
        for port in expected_ports:
            if not await netns.connects_from_inside(
                netns_path, placement.ip, port, VERIFY_CONNECT_TIMEOUT_S
            ):
                raise RuntimeFailure(f"{placement.name} does not accept connections on port {port}")
        return VerifyResult(restored_pid=state.pid)

    async def open_network(self, placement: Placement, migration_id: str) -> Opened:
        """Let clients in: the held packets first, in the order they came, then everything;
        and tell neighbours where the container's MAC lives now."""
        netns_path = self.cpaths(placement.name).netns
        paths = self.paths(migration_id)
        with tracer.start_as_current_span("network.cutover") as span:
            await netns.set_answering(netns_path, answering=True)
            # Released before the rules go: what arrives in between passes at once, behind
            # the held ones. (No holder: an earlier delivery released it, or it died and the
            # kernel dropped what waited — clients retransmit.)
            held = await packet_hold.command(paths.root, "release")
            opened_at = time.time()
            await netlock.release(netns_path)
            stopped = await packet_hold.command(paths.root, "stop")
            announced = await netns.announce(netns_path, placement.ip)
            span.set_attribute("ferry.announced", announced)
            final = stopped or held
            if final is not None:
                for key, value in asdict(final).items():
                    if value is not None and key != "mode":
                        span.set_attribute(f"ferry.hold.{key}", value)
        if not paths.lazy.exists():  # a lazy-pages daemon still works in there
            shutil.rmtree(paths.root, ignore_errors=True)
        return Opened(announced=announced, opened_at=opened_at, hold=final)

    async def drain_pages(
        self,
        migration_id: str,
        stalled_after_s: float,
        heard: Callable[[lazy_pages.DaemonView], Awaitable[None]] | None = None,
    ) -> DrainResult | None:
        """Post-copy, after the commit: wait until the lazy-pages daemon has every page and
        exits 0, for as long as pages keep arriving. Until then the source keeps its stopped
        copy. None when an earlier delivery drained it (the directory is gone).

        Fails (so the saga falls back to the source) only when pages stop: the daemon died
        or failed, or it logged nothing for `stalled_after_s` — never for taking long."""
        paths = self.paths(migration_id)
        if not paths.lazy.exists():
            return None
        if self.faults.carries(migration_id, "lazy-pages-dies"):
            # Test-only fault: the daemon dies after the commit with pages still at the
            # source. (Not right after the restore: the restored process would run on
            # zero-filled pages before verify, which then fails before the commit.)
            with contextlib.suppress(OSError, ValueError):
                pid_file = layout.pid_file(paths.images, layout.LAZY_PAGES)
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        log = paths.criu_log(layout.LAZY_PAGES)
        started = last_sign = time.monotonic()
        logged = -1
        gone_since: float | None = None
        while True:
            view = lazy_pages.look(paths.images, log)
            if view.rc is not None:
                break
            now = time.monotonic()
            if view.logged_bytes != logged:
                logged, last_sign = view.logged_bytes, now
                if heard is not None:
                    await heard(view)
            gone_since = None if view.alive else (gone_since or now)
            if gone_since is not None and now - gone_since > EXIT_CODE_GRACE_S:
                # Gone without an exit code: killed with its wrapper (or the host rebooted).
                # (Not at once: the wrapper writes the code a moment after the daemon exits.)
                raise RuntimeFailure(
                    "the lazy-pages daemon died: pages may be missing", log_tail=criu.tail(log)
                )
            everything_in = view.total_pages and view.copied_pages == view.total_pages
            if now - last_sign > stalled_after_s and not everything_in:
                # (With every page in, memory is whole: the daemon is only saying goodbye
                # to a source it cannot reach yet; wait for its exit, never fall back.)
                raise RuntimeFailure(
                    f"no page arrived for {stalled_after_s:.0f} s"
                    f" ({view.copied_pages or 0}/{view.total_pages or '?'} pages copied)",
                    log_tail=criu.tail(log),
                )
            await asyncio.sleep(DRAIN_POLL_S)
        if view.rc != 0:
            raise RuntimeFailure(
                f"the lazy-pages daemon exited {view.rc}: pages may be missing",
                log_tail=criu.tail(log),
            )
        result = DrainResult(drain_ms=round((time.monotonic() - started) * 1000))
        shutil.rmtree(paths.root, ignore_errors=True)
        return result

    async def stop_restored(self, name: str, migration_id: str) -> None:
        """The destination copy goes away: before the commit, or in post-copy's fallback
        (its memory has holes) — in both cases before the source may run again."""
        # Cut its network first: a killed process's sockets send FIN/RST, and after a
        # post-copy commit its network is open — the client would lose its connection.
        if self.cpaths(name).netns.exists():
            await netlock.hold(self.cpaths(name).netns)
        await netns.set_link(name, up=False)
        kill_working_on(self.paths(migration_id).root)
        await self.runc.delete(name)

    async def discard(self, name: str, migration_id: str) -> None:
        """Remove everything this host holds for an incoming container that will not stay."""
        paths = self.paths(migration_id)
        criu.stop_page_server(paths.images)
        kill_working_on(paths.root)
        firewall.forget_peers(migration_id)
        await self.containers.discard_local(name)
        # Only volumes this very move brought here: never one this host held before.
        for volume in self.containers.volumes.names():
            self.containers.volumes.discard_arrived(volume, migration_id)
        shutil.rmtree(paths.root, ignore_errors=True)
