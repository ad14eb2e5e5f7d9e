"""The host side of a live migration: what each saga step does to runc, CRIU and the kernel.

Source: preflight, dump (pages straight into the destination's page server), resume.
Destination: prepare, restore behind a held network, verify, open, discard.
Every operation is idempotent: a redelivered command finds its work done and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from schemas.v1.containers import Placement
from services.config import HostConfig
from services.errors import Conflict, RuntimeFailure
from services.runtime import bundle, criu, layers, netlock, netns, precopy, tcprepair, transfer
from services.runtime.containers import ContainerPaths, HostContainers
from services.runtime.proc import arun, process_state
from services.runtime.proc import tree as proc_tree
from services.runtime.runc import log_errors

tracer = trace.get_tracer("ferry")

log = logging.getLogger(__name__)

RUNC_CRIU_FLAGS = ["--tcp-established", "--manage-cgroups-mode", "soft"]
PAGE_SERVER_EXIT_S = 30.0
PRESYNC_MANIFEST = "presync.manifest.json"
VERIFY_CONNECT_TIMEOUT_S = 2.0
PRE_DUMP_TIMEOUT_S = 300.0
LAZY_DUMP_READY_S = 120.0  # freeze and dump everything but the pages
LAZY_DUMP_EXIT_S = 15.0  # a source CRIU whose peer is gone exits at once


@dataclass(frozen=True)
class TransferOptions:
    """How this migration's own transfers go: a rate cap, compression, a progress hook."""

    limit_bps: int | None = None
    compress: bool = False
    on_progress: transfer.Progress | None = None


@dataclass(frozen=True)
class MigrationPaths:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class MigrationHost:
    """This host's part in migrations, whichever side it is on."""

    def __init__(self, config: HostConfig, containers: HostContainers) -> None:
        self.config = config
        self.containers = containers
        self.runc = containers.runc

    def mpaths(self, migration_id: str) -> MigrationPaths:
        return MigrationPaths(transfer.migration_dir(self.config.state_dir, migration_id))

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

    def _runc(self, *args: str, log_file: Path) -> list[str]:
        return [
            self.runc.binary, "--root", str(self.runc.root), "--criu", criu.CRIU,
            "--log", str(log_file), "--log-format", "json", *args,
        ]  # fmt: skip

    # ---- source -----------------------------------------------------------------------

    async def preflight(self, name: str) -> dict[str, int | str]:
        await criu.check()
        state = await self.runc.state(name)
        if state is None or state.status != "running" or state.pid is None:
            status = state.status if state else "not known to runc"
            raise RuntimeFailure(
                f"{name} is {status} on {self.config.host}; only a running container moves"
            )
        ports = sorted(netlock.listening_ports(state.pid))
        return {"listening_ports": json.dumps(ports), "source_pid": state.pid}

    async def check(
        self, name: str, side: str, needed_bytes: int
    ) -> tuple[list[tuple[str, bool, str]], int]:
        """Dry-run checks for this host's part; returns (check, ok, detail) and memory use."""
        results: list[tuple[str, bool, str]] = []
        try:
            await criu.check()
            results.append(("criu", True, "criu check: looks good"))
        except RuntimeFailure as exc:
            results.append(("criu", False, exc.reason))
        state = await self.runc.state(name)
        memory = 0
        if side == "source":
            running = state is not None and state.status == "running" and state.pid is not None
            detail = "running" if running else (state.status if state else "not known to runc")
            results.append(("container running here", running, detail))
            if running and state is not None and state.pid is not None:
                memory = container_memory(state.pid)
                ports = sorted(netlock.listening_ports(state.pid))
                results.append(("listening ports", True, f"{ports}"))
        else:
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
        return results, memory

    async def _dump_done_or_ready(self, name: str, paths: MigrationPaths) -> dict[str, Any] | None:
        """An earlier delivery's dump result, or None once it is safe to dump now."""
        done_marker = paths.root / "dump.done"
        if done_marker.exists():
            return dict(json.loads(done_marker.read_text()))
        state = await self.runc.state(name)
        if state is None or state.status != "running":
            raise RuntimeFailure(f"{name} is not running on {self.config.host}; refusing to dump")
        paths.images.mkdir(parents=True, exist_ok=True)
        return None

    async def dump(
        self, name: str, migration_id: str, page_server: str, *, parent: str | None = None
    ) -> dict[str, int | float]:
        """Freeze and dump; pages stream to the destination. The source copy stops here.
        After pre-copy rounds, `parent` (../it-N) makes it send only what changed since."""
        paths = self.mpaths(migration_id)
        done_marker = paths.root / "dump.done"
        earlier = await self._dump_done_or_ready(name, paths)
        if earlier is not None:
            return earlier
        span = tracer.start_span("criu.dump", attributes={"ferry.page_server": page_server})
        frozen_at = time.time()
        proc = await asyncio.create_subprocess_exec(
            *self._runc(
                "checkpoint", "--image-path", str(paths.images), "--work-path", str(paths.images),
                "--page-server", page_server, *(["--parent-path", parent] if parent else []),
                *RUNC_CRIU_FLAGS, name, log_file=paths.root / "runc.log",
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        code = await proc.wait()
        dumped_at = time.time()
        if code != 0:
            errors = log_errors(paths.root / "runc.log")
            failure = RuntimeFailure(
                f"checkpoint of {name} failed: {errors[-1] if errors else f'exit {code}'}",
                log_tail=criu.tail(paths.images / "dump.log"),
            )
            _fail(span, failure)
            span.end()
            raise failure
        # The destination will answer for this MAC: take the source's port off the bridge.
        await arun(["ip", "link", "set", netns.host_veth_name(name), "down"], check=False)
        stats = criu.load_stats(paths.images / "stats-dump")
        facts: dict[str, int | float] = {
            "frozen_at": frozen_at,
            "dump_ms": round((dumped_at - frozen_at) * 1000),
            "pages_written": stats.get("pages_written", 0),
            "criu_freezing_us": stats.get("freezing_time", 0),
            "criu_frozen_us": stats.get("frozen_time", 0),
            "criu_memdump_us": stats.get("memdump_time", 0),
            "criu_memwrite_us": stats.get("memwrite_time", 0),
        }
        for key, value in facts.items():
            span.set_attribute(f"criu.{key}", value)
        span.set_attribute("ferry.page_bytes", int(facts["pages_written"]) * 4096)
        span.set_attribute("criu.pages_scanned", stats.get("pages_scanned", 0))
        span.end()
        done_marker.write_text(json.dumps(facts))
        return facts

    async def pre_dump(
        self, name: str, migration_id: str, iteration: int, page_server: str
    ) -> dict[str, int]:
        """Pre-copy round `iteration`: the pages dirtied since the last round go to the
        destination while the container keeps running. Returns CRIU's statistics."""
        layout = precopy.PrecopyLayout(self.mpaths(migration_id).root)
        images = layout.iteration(iteration)
        stats_file = images / "stats-dump"
        if stats_file.exists():
            return criu.load_stats(stats_file)  # this round ran before a redelivery
        images.mkdir(parents=True, exist_ok=True)
        log_file = images / "runc.log"
        argv = precopy.pre_dump_argv(
            self.runc, name, layout, iteration, page_server, log_file=log_file
        )
        with tracer.start_as_current_span(
            "criu.pre_dump", attributes={"ferry.round": iteration, "ferry.page_server": page_server}
        ) as span:
            done = await arun(argv, check=False, timeout=PRE_DUMP_TIMEOUT_S)
            if done.returncode != 0:
                errors = log_errors(log_file)
                failure = RuntimeFailure(
                    f"pre-dump round {iteration} of {name} failed:"
                    f" {errors[-1] if errors else f'exit {done.returncode}'}",
                    log_tail=criu.tail(images / "dump.log"),
                )
                _fail(span, failure)
                raise failure
            stats = criu.load_stats(stats_file)
            for key, value in stats.items():
                span.set_attribute(f"criu.{key}", value)
        return stats

    async def start_round_page_server(
        self, migration_id: str, images: str, parent: str | None
    ) -> str:
        """Destination side of a pre-copy round: a page server for `images` (it-N, or the
        final `images`), chained to the previous round's directory."""
        root = self.mpaths(migration_id).root
        target = root / images
        port_file = target / "page-server.port"
        if port_file.exists() and criu.background_pid(target, "page-server") is not None:
            return f"{self.config.address}:{port_file.read_text()}"
        port = free_port(self.config.address)
        argv = precopy.page_server_argv(
            target, self.config.address, port, status_fd=0, parent=parent
        )
        argv[argv.index("--status-fd") + 1] = criu.STATUS_FD
        await criu.start_background(argv, target, "page-server")
        port_file.write_text(str(port))
        return f"{self.config.address}:{port}"

    async def dump_lazy(self, name: str, migration_id: str) -> dict[str, int | float | str]:
        """Post-copy: freeze and dump all but the memory pages, which this host then serves
        to the destination on demand. CRIU leaves the source *stopped*, not killed, once
        the pages are served: the way back until the destination is verified."""
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        done_marker = paths.root / "dump.done"
        earlier = await self._dump_done_or_ready(name, paths)
        if earlier is not None:
            return earlier
        port = free_port(self.config.address)
        # Tells resume that the source waits stopped, and where its page server listens.
        (paths.root / "lazy").write_text(f"{self.config.address}:{port}")
        bundle.ensure_criu_config(cpaths.criu_config, leave_stopped=True)
        span = tracer.start_span(
            "criu.dump", attributes={"ferry.lazy_pages": f"{self.config.address}:{port}"}
        )
        frozen_at = time.time()
        argv = self._runc(
            "checkpoint", "--image-path", str(paths.images), "--work-path", str(paths.images),
            "--lazy-pages", "--page-server", f"{self.config.address}:{port}",
            "--status-fd", criu.STATUS_FD, "--leave-running", *RUNC_CRIU_FLAGS, name,
            log_file=paths.root / "runc.log",
        )  # fmt: skip
        try:
            await criu.start_background(argv, paths.images, "lazy-dump", LAZY_DUMP_READY_S)
        except RuntimeFailure as exc:
            errors = log_errors(paths.root / "runc.log")
            failure = RuntimeFailure(
                f"lazy checkpoint of {name} failed: {errors[-1] if errors else exc.reason}",
                log_tail=criu.tail(paths.images / "dump.log"),
            )
            _fail(span, failure)
            span.end()
            raise failure from exc
        finally:
            # CRIU read the file when it started; later dumps of this container must not stop.
            bundle.ensure_criu_config(cpaths.criu_config)
        dumped_at = time.time()
        await arun(["ip", "link", "set", netns.host_veth_name(name), "down"], check=False)
        facts: dict[str, int | float | str] = {
            "frozen_at": frozen_at,
            "dump_ms": round((dumped_at - frozen_at) * 1000),
            "lazy_pages": f"{self.config.address}:{port}",
        }
        span.set_attribute("criu.dump_ms", facts["dump_ms"])
        span.end()
        done_marker.write_text(json.dumps(facts))
        return facts

    async def source_pages_served(self, migration_id: str, timeout: float) -> dict[str, int]:
        """After the destination has pulled every page, the source's CRIU exits; the
        dump's page maps say how many pages it served."""
        paths = self.mpaths(migration_id)
        rc = await criu.background_result(paths.images, "lazy-dump", timeout)
        return {
            "source_criu_rc": -1 if rc is None else rc,
            "pages_written": criu.pagemap_pages(paths.images),
        }

    async def presync_files(
        self, name: str, migration_id: str, address: str, port: int, options: TransferOptions
    ) -> transfer.Sent:
        """While the container still runs: its overlay upper dir, whole, to the destination.
        The manifest taken first is what the delta after the freeze is computed against."""
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        paths.root.mkdir(parents=True, exist_ok=True)
        with tracer.start_as_current_span(
            "fs.presync", attributes={"ferry.peer": f"{address}:{port}"}
        ) as span:
            sent, since = await transfer.push_presync(
                address, port, migration_id, cpaths.root, "upper", self.config.state_dir / "tmp",
                limit_bps=options.limit_bps, compress=options.compress,
                on_progress=options.on_progress,
            )  # fmt: skip
            _transfer_attributes(span, sent)
        (paths.root / PRESYNC_MANIFEST).write_text(json.dumps(since))
        return sent

    def forget_presync(self, migration_id: str) -> bool:
        """Remove what a pre-sync left on the source, unless a dump happened here (then
        resuming the source owns that directory). Returns whether anything went."""
        paths = self.mpaths(migration_id)
        dumped = any((paths.root / marker).exists() for marker in ("dump.done", "lazy"))
        if dumped or (paths.images / "inventory.img").exists() or not paths.root.exists():
            return False
        kill_migration_processes(self.config.state_dir, migration_id)
        shutil.rmtree(paths.root, ignore_errors=True)
        return True

    async def push_bundle(
        self,
        name: str,
        migration_id: str,
        address: str,
        port: int,
        options: TransferOptions,
        damage: Callable[[], bool] | None = None,
    ) -> list[transfer.Sent]:
        """After the freeze: images and bundle config, then what changed in the upper dir
        since the pre-sync (all of it if no pre-sync happened)."""
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        members = [
            transfer.Member(paths.root, "images"),
            transfer.Member(cpaths.bundle, "config.json"),
        ]
        scratch = self.config.state_dir / "tmp"
        manifest_file = paths.root / PRESYNC_MANIFEST
        with tracer.start_as_current_span(
            "fs.sync", attributes={"ferry.peer": f"{address}:{port}"}
        ) as span:
            bundle = transfer.push(
                address, port, migration_id, "bundle", members, scratch, damage,
                limit_bps=options.limit_bps, compress=options.compress,
                on_progress=options.on_progress,
            )  # fmt: skip
            if manifest_file.exists():
                since = json.loads(manifest_file.read_text())
                files = transfer.push_delta(
                    address, port, migration_id, cpaths.root, "upper", since, scratch,
                    limit_bps=options.limit_bps, compress=options.compress,
                    on_progress=options.on_progress,
                )  # fmt: skip
            else:
                files = _first(
                    transfer.push_presync(
                        address, port, migration_id, cpaths.root, "upper", scratch,
                        limit_bps=options.limit_bps, compress=options.compress,
                        on_progress=options.on_progress,
                    )
                )  # fmt: skip
            if options.limit_bps:  # one after the other, or the two would share no limit
                sent = [await bundle, await files]
            else:  # side by side: this runs inside the freeze window
                sent = list(await asyncio.gather(bundle, files))
            _transfer_attributes(span, *sent)
        return sent

    async def resume(self, placement: Placement, migration_id: str, peer: str, port: int) -> str:
        """Bring the container back on this host: untouched, thawed, or restored from its
        images with the pages fetched back from the destination."""
        name = placement.name
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        veth = netns.host_veth_name(name)
        if (paths.root / "lazy").exists():
            how = await self._resume_stopped(name, paths, cpaths)
            if how:
                # After a post-copy fallback the switches last saw it on the destination.
                await self._announce(placement)
                return how
        if kill_migration_processes(self.config.state_dir, migration_id):
            await asyncio.sleep(0.2)  # let the kernel release what a killed CRIU held
        state = await self.runc.state(name)
        if state is not None and state.status == "running":
            await netlock.remove_criu_lock(cpaths.netns)
            await arun(["ip", "link", "set", veth, "up"], check=False)
            shutil.rmtree(paths.root, ignore_errors=True)
            return "still running"
        if state is not None and state.status == "paused":
            await arun([self.runc.binary, "--root", str(self.runc.root), "resume", name])
            await netlock.remove_criu_lock(cpaths.netns)
            await arun(["ip", "link", "set", veth, "up"], check=False)
            shutil.rmtree(paths.root, ignore_errors=True)
            return "thawed"
        if (
            not (paths.root / "dump.done").exists()
            and not (paths.images / "inventory.img").exists()
        ):
            raise RuntimeFailure(f"{name} is gone and no dump of it exists here: cannot resume")
        if not list(paths.images.glob("pages-*.img")):
            with tracer.start_as_current_span("pages.fetch_back", attributes={"ferry.peer": peer}):
                await transfer.pull(
                    peer, port, migration_id, "pages", paths.images, self.config.state_dir / "tmp"
                )
        # The overlay normally stays mounted on the source until clean_source; mount it
        # again if it went (its layers are kept on this host; fetched if ever removed).
        ready = await self.containers.ensure_layers(placement.layers)
        await layers.mount_overlay(ready.paths, cpaths.upper, cpaths.work, cpaths.rootfs)
        # CRIU's lock from the dump still holds the netns; its restore removes it at the end.
        await arun(["ip", "link", "set", veth, "up"], check=False)
        await self._restore(name, paths, cpaths)
        shutil.rmtree(paths.root, ignore_errors=True)
        return "restored from images"

    async def _resume_stopped(
        self, name: str, paths: MigrationPaths, cpaths: ContainerPaths
    ) -> str | None:
        """Post-copy's way back: the source waits stopped. Let its CRIU finish (nobody will
        pull pages any more: the destination was stopped first), unlock its network, take
        its connections out of repair mode, and let it run. None if it is not there."""
        dumper = criu.background_pid(paths.images, "lazy-dump")
        if dumper is not None:
            await _poke((paths.root / "lazy").read_text())
            if await criu.background_result(paths.images, "lazy-dump", LAZY_DUMP_EXIT_S) is None:
                # CRIU is hung: stop the tasks first, so killing it cannot set them running
                # behind our back, then kill it.
                await self.runc.kill(name, "STOP", all_processes=True)
                kill_migration_processes(self.config.state_dir, paths.root.name)
                await asyncio.sleep(0.2)
        state = await self.runc.state(name)
        if state is None or state.pid is None or state.status not in ("running", "paused"):
            return None
        if state.status == "paused":  # a CRIU killed mid-dump leaves the freezer frozen
            await arun([self.runc.binary, "--root", str(self.runc.root), "resume", name])
        await netlock.remove_criu_lock(cpaths.netns)
        repaired = 0
        for pid in proc_tree(state.pid):
            with contextlib.suppress(OSError):
                repaired += await asyncio.to_thread(tcprepair.repair_off, pid)
        await arun(["ip", "link", "set", netns.host_veth_name(name), "up"], check=False)
        stopped = process_state(state.pid) in ("T", "t")
        await self.runc.kill(name, "CONT", all_processes=True)
        shutil.rmtree(paths.root, ignore_errors=True)
        return (
            f"resumed from stopped ({repaired} connection(s) out of repair)"
            if stopped
            else "still running"
        )

    # ---- destination ------------------------------------------------------------------

    async def prepare(
        self, placement: Placement, migration_id: str, *, page_server: bool = True
    ) -> dict[str, int | str]:
        """Layers present, netns with the container's IP and MAC (link down), and for
        stop-and-copy a page server up (post-copy pulls its pages from the source instead)."""
        await criu.check()
        existing = await self.runc.state(placement.name)
        if existing is not None:
            raise Conflict(f"{placement.name} already exists on {self.config.host}")
        paths = self.mpaths(migration_id)
        port_file = paths.root / "page-server.port"
        # Layers are not part of what moves: a host lacking one fetches it from the layer
        # store once, sha256-verified, and keeps it for every later container and move.
        with tracer.start_as_current_span("layers.ensure") as span:
            ready = await self.containers.ensure_layers(placement.layers)
            for key, value in ready.facts().items():
                span.set_attribute(f"ferry.{key}", value)
        facts: dict[str, int | str] = dict(ready.facts())
        cpaths = self.cpaths(placement.name)
        if not cpaths.netns.exists():
            await netns.create(self._network(placement), self.config.bridge, link_up=False)
        # The hold goes on now, before any freeze: one less thing inside the freeze window.
        with tracer.start_as_current_span("network.hold"):
            await netlock.hold(cpaths.netns)
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / "held").touch()
        if not page_server:
            paths.root.mkdir(parents=True, exist_ok=True)
            return facts
        if port_file.exists() and (paths.images / "page-server.pid").exists():
            return {**facts, "page_server": f"{self.config.address}:{port_file.read_text()}"}
        port = free_port(self.config.address)
        with tracer.start_as_current_span(
            "criu.page_server", attributes={"ferry.listen": f"{self.config.address}:{port}"}
        ):
            await criu.start_page_server(paths.images, self.config.address, port)
        port_file.write_text(str(port))
        return {**facts, "page_server": f"{self.config.address}:{port}"}

    async def restore(
        self,
        placement: Placement,
        migration_id: str,
        frozen_at: float,
        *,
        lazy_from: str | None = None,
        sabotage: bool = False,
        daemon_dies: bool = False,
    ) -> dict[str, int | float]:
        """Restore behind a held network. With `lazy_from` (post-copy) the memory pages are
        not here yet: a lazy-pages daemon fetches them from the source as they are touched."""
        name = placement.name
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        state = await self.runc.state(name)
        if state is not None and state.status == "running":
            return {}  # restored by an earlier delivery of this command
        rc = 0 if lazy_from else await criu.page_server_result(paths.images, PAGE_SERVER_EXIT_S)
        if rc != 0:
            raise RuntimeFailure(
                f"page server {'still waiting' if rc is None else f'exited {rc}'}:"
                " the pages did not all arrive",
                log_tail=criu.tail(paths.images / "page-server.log"),
            )
        incoming = paths.incoming / "bundle"
        if not incoming.is_dir():
            raise RuntimeFailure("the bundle from the source has not arrived")
        paths.images.mkdir(parents=True, exist_ok=True)
        for item in incoming.joinpath("images").iterdir():
            target = paths.images / item.name
            if not target.exists():
                shutil.move(str(item), target)
        if not cpaths.upper.exists():
            synced = paths.incoming / "presync" / "upper"
            if not synced.is_dir():
                raise RuntimeFailure("the container's files from the source have not arrived")
            cpaths.root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(synced), cpaths.upper)
        shutil.rmtree(cpaths.work, ignore_errors=True)
        ready = await self.containers.ensure_layers(placement.layers)  # here since prepare
        await layers.mount_overlay(ready.paths, cpaths.upper, cpaths.work, cpaths.rootfs)
        config = json.loads((incoming / "config.json").read_text())
        config["linux"]["cgroupsPath"] = f"{self.config.cgroup_parent}/{name}"
        config.setdefault("annotations", {})["org.criu.config"] = str(
            bundle.ensure_criu_config(cpaths.criu_config)
        )
        cpaths.bundle.mkdir(parents=True, exist_ok=True)
        (cpaths.bundle / "config.json").write_text(json.dumps(config, indent=2))
        # Held (since prepare), then link up, then restore: no packet reaches it before
        # the commit.
        if not (paths.root / "held").exists():
            with tracer.start_as_current_span("network.hold"):
                await netlock.hold(cpaths.netns)
        await arun(["ip", "link", "set", netns.host_veth_name(name), "up"])
        if lazy_from:
            (paths.root / "lazy").write_text(lazy_from)
            if criu.background_pid(paths.images, "lazy-pages") is None:
                host, port = lazy_from.rsplit(":", 1)
                with tracer.start_as_current_span(
                    "criu.lazy_pages", attributes={"ferry.peer": lazy_from}
                ):
                    await criu.start_lazy_pages(paths.images, host, int(port))
        if sabotage:
            # Test-only fault: a damaged image makes the real CRIU restore fail (in post-copy,
            # after the lazy-pages daemon has connected to the source: CRIU's worst case).
            (paths.images / "inventory.img").write_bytes(b"ferry: injected fault\n")
        await self._restore(name, paths, cpaths, lazy=bool(lazy_from))
        running_at = time.time()
        if lazy_from and daemon_dies:
            # Test-only fault: the lazy-pages daemon dies with pages still at the source.
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((paths.images / "lazy-pages.pid").read_text()), signal.SIGKILL)
        stats = criu.load_stats(paths.images / "stats-restore")
        return {
            "running_at": running_at,
            "freeze_ms": round((running_at - frozen_at) * 1000) if frozen_at else 0,
            "criu_restore_us": stats.get("restore_time", 0),
            "pages_restored": stats.get("pages_restored", 0),
        }

    async def _restore(
        self, name: str, paths: MigrationPaths, cpaths: ContainerPaths, *, lazy: bool = False
    ) -> None:
        with tracer.start_as_current_span("criu.restore") as span:
            try:
                await self._runc_restore(name, paths, cpaths, lazy=lazy)
            except RuntimeFailure as failure:
                _fail(span, failure)
                raise
            stats = criu.load_stats(paths.images / "stats-restore")
            span.set_attribute("criu.restore_time_us", stats.get("restore_time", 0))
            span.set_attribute("criu.pages_restored", stats.get("pages_restored", 0))

    async def _runc_restore(
        self, name: str, paths: MigrationPaths, cpaths: ContainerPaths, *, lazy: bool = False
    ) -> None:
        log_file = paths.root / "runc-restore.log"
        proc = await asyncio.create_subprocess_exec(
            *self._runc(
                "restore", "--detach", "--image-path", str(paths.images),
                "--work-path", str(paths.images), "--bundle", str(cpaths.bundle),
                *(["--lazy-pages"] if lazy else []), *RUNC_CRIU_FLAGS, name, log_file=log_file,
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        code = await proc.wait()
        if code != 0:
            errors = log_errors(log_file)
            raise RuntimeFailure(
                f"restore of {name} failed: {errors[-1] if errors else f'exit {code}'}",
                log_tail=criu.tail(paths.images / "restore.log"),
            )
        state = await self.runc.state(name)
        if state is None or state.status != "running":
            raise RuntimeFailure(f"{name} did not stay running after restore")

    async def verify(self, placement: Placement, expected_ports: list[int]) -> dict[str, int]:
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
        return {"restored_pid": state.pid}

    async def open_network(self, placement: Placement, migration_id: str) -> list[str]:
        """Let clients in, and tell neighbours where the container's MAC lives now:
        a gratuitous ARP for its IPv4 address, unsolicited neighbour advertisements
        for its IPv6 addresses. Returns the addresses announced."""
        with tracer.start_as_current_span("network.cutover") as span:
            announced = await self._cut_over(placement)
            span.set_attribute("ferry.announced", announced)
        paths = self.mpaths(migration_id)
        if not (paths.root / "lazy").exists():  # a lazy-pages daemon still works in there
            shutil.rmtree(paths.root, ignore_errors=True)
        return announced

    async def drain_pages(self, migration_id: str, timeout: float) -> dict[str, int]:
        """Post-copy, after the commit: wait until the lazy-pages daemon has every page and
        exits 0. Until then the source keeps its stopped copy."""
        paths = self.mpaths(migration_id)
        if not (paths.root / "lazy").exists():
            return {}  # drained by an earlier delivery (the directory is gone)
        started = time.monotonic()
        rc = await criu.background_result(paths.images, "lazy-pages", timeout)
        if rc is None:
            raise RuntimeFailure(
                f"the lazy-pages daemon still runs after {timeout:.0f} s",
                log_tail=criu.tail(paths.images / "lazy-pages.log"),
                retryable=True,
            )
        if rc != 0:
            raise RuntimeFailure(
                f"the lazy-pages daemon exited {rc}: pages may be missing",
                log_tail=criu.tail(paths.images / "lazy-pages.log"),
            )
        facts = {"drain_ms": round((time.monotonic() - started) * 1000)}
        shutil.rmtree(paths.root, ignore_errors=True)
        return facts

    async def _cut_over(self, placement: Placement) -> list[str]:
        await netlock.release(self.cpaths(placement.name).netns)
        return await self._announce(placement)

    async def _announce(self, placement: Placement) -> list[str]:
        netns_path = self.cpaths(placement.name).netns
        inside = ["nsenter", f"--net={netns_path}"]
        garp = ["busybox", "arping", "-U", "-c", "1", "-I", "eth0", placement.ip]
        announced = (
            [placement.ip] if (await arun([*inside, *garp], check=False)).returncode == 0 else []
        )
        ndp = await arun(
            [*inside, sys.executable, "-m", "services.runtime.ndp", "eth0"], check=False
        )
        if ndp.returncode == 0:
            announced += ndp.stdout.split()
        else:
            log.warning("IPv6 neighbour advertisement failed: %s", ndp.stderr.strip())
        return announced

    async def stop_restored(self, name: str, migration_id: str) -> None:
        """The destination copy goes away: before the commit, or in post-copy's fallback
        (its memory has holes) — in both cases before the source may run again."""
        # Cut its network first: a killed process's sockets send FIN/RST, and after a
        # post-copy commit its network is open — the client would lose its connection.
        if self.cpaths(name).netns.exists():
            await netlock.hold(self.cpaths(name).netns)
        await arun(["ip", "link", "set", netns.host_veth_name(name), "down"], check=False)
        kill_migration_processes(self.config.state_dir, migration_id)
        await self.runc.delete(name)

    async def discard(self, name: str, migration_id: str) -> None:
        """Remove everything this host holds for an incoming container that will not stay."""
        paths = self.mpaths(migration_id)
        criu.stop_page_server(paths.images)
        kill_migration_processes(self.config.state_dir, migration_id)
        await self.containers.discard_local(name)
        shutil.rmtree(paths.root, ignore_errors=True)

    async def clean_source(self, name: str, migration_id: str) -> None:
        """After the commit: the stopped source copy's netns, veth, mounts and files go."""
        await self.containers.discard_local(name)
        shutil.rmtree(self.mpaths(migration_id).root, ignore_errors=True)


async def _first(pair: Awaitable[tuple[transfer.Sent, object]]) -> transfer.Sent:
    return (await pair)[0]


def _transfer_attributes(span: trace.Span, *sent: transfer.Sent) -> None:
    wire = sum(x.bytes for x in sent)
    seconds = sum(x.seconds for x in sent)
    span.set_attribute("ferry.bytes", wire)
    span.set_attribute("ferry.raw_bytes", sum(x.raw_bytes or x.bytes for x in sent))
    span.set_attribute("ferry.entries", sum(x.entries for x in sent))
    span.set_attribute("ferry.deleted", sum(x.deleted for x in sent))
    span.set_attribute("ferry.seconds", round(seconds, 4))
    span.set_attribute("ferry.rate_bps", round(wire / max(seconds, 1e-6)))
    span.set_attribute("ferry.sha256", ",".join(x.sha256 for x in sent))


def _fail(span: trace.Span, failure: RuntimeFailure) -> None:
    """Mark a span failed, with CRIU's own last words as an event."""
    span.set_status(StatusCode.ERROR, failure.reason)
    span.set_attribute("error.type", type(failure).__name__)
    span.set_attribute("ferry.retryable", failure.retryable)
    if failure.log_tail:
        span.add_event("criu.log", {"lines": failure.log_tail.splitlines()[-20:]})


async def _poke(address: str) -> None:
    """Connect to a waiting source page server and hang up: CRIU then ends its dump (and,
    with leave-stopped, leaves the source stopped) instead of waiting forever."""
    host, port = address.rsplit(":", 1)
    with contextlib.suppress(OSError, TimeoutError):
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
        writer.close()


def container_memory(pid: int) -> int:
    """Resident memory of the container's process tree rooted at `pid`, in bytes."""
    total = 0
    for current in proc_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def kill_migration_processes(state_dir: Path, migration_id: str) -> int:
    """SIGKILL whatever still works on this migration here (a page server, runc, CRIU):
    a step that was abandoned must not finish behind its compensation's back."""
    marker = f"{state_dir}/migrations/{migration_id}".encode()
    # Only this host's processes: simulated hosts share /proc but not their mount namespace.
    own_mounts = os.stat("/proc/self/ns/mnt").st_ino
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            if marker in cmdline and os.stat(f"{entry.path}/ns/mnt").st_ino != own_mounts:
                continue
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
    return killed
