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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from schemas.v1.containers import Placement
from services.config import HostConfig
from services.errors import Conflict, RuntimeFailure
from services.runtime import bundle, criu, layers, netlock, netns, transfer
from services.runtime.containers import ContainerPaths, HostContainers
from services.runtime.proc import arun
from services.runtime.runc import log_errors

tracer = trace.get_tracer("ferry")

log = logging.getLogger(__name__)

RUNC_CRIU_FLAGS = ["--tcp-established", "--manage-cgroups-mode", "soft"]
PAGE_SERVER_EXIT_S = 30.0
VERIFY_CONNECT_TIMEOUT_S = 2.0


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

    async def dump(self, name: str, migration_id: str, page_server: str) -> dict[str, int | float]:
        """Freeze and dump; pages stream to the destination. The source copy stops here."""
        paths = self.mpaths(migration_id)
        done_marker = paths.root / "dump.done"
        if done_marker.exists():
            return dict(json.loads(done_marker.read_text()))
        state = await self.runc.state(name)
        if state is None or state.status != "running":
            raise RuntimeFailure(f"{name} is not running on {self.config.host}; refusing to dump")
        paths.images.mkdir(parents=True, exist_ok=True)
        span = tracer.start_span("criu.dump", attributes={"ferry.page_server": page_server})
        frozen_at = time.time()
        proc = await asyncio.create_subprocess_exec(
            *self._runc(
                "checkpoint", "--image-path", str(paths.images), "--work-path", str(paths.images),
                "--page-server", page_server, *RUNC_CRIU_FLAGS, name,
                log_file=paths.root / "runc.log",
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

    async def push_bundle(
        self,
        name: str,
        migration_id: str,
        address: str,
        port: int,
        damage: Callable[[], bool] | None = None,
    ) -> transfer.Sent:
        """Images, bundle config and the overlay's upper dir, to the destination."""
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        members = [
            transfer.Member(paths.root, "images"),
            transfer.Member(cpaths.root, "upper"),
            transfer.Member(cpaths.bundle, "config.json"),
        ]
        with tracer.start_as_current_span(
            "fs.sync", attributes={"ferry.peer": f"{address}:{port}"}
        ) as span:
            sent = await transfer.push(
                address,
                port,
                migration_id,
                "bundle",
                members,
                self.config.state_dir / "tmp",
                damage=damage,
            )
            span.set_attribute("ferry.bytes", sent.bytes)
            span.set_attribute("ferry.seconds", round(sent.seconds, 4))
            span.set_attribute("ferry.rate_bps", round(sent.bytes / max(sent.seconds, 1e-6)))
            span.set_attribute("ferry.sha256", sent.sha256)
        return sent

    async def resume(self, placement: Placement, migration_id: str, peer: str, port: int) -> str:
        """Bring the container back on this host: untouched, thawed, or restored from its
        images with the pages fetched back from the destination."""
        name = placement.name
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        veth = netns.host_veth_name(name)
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
        # CRIU's lock from the dump still holds the netns; its restore removes it at the end.
        await arun(["ip", "link", "set", veth, "up"], check=False)
        await self._restore(name, paths, cpaths)
        shutil.rmtree(paths.root, ignore_errors=True)
        return "restored from images"

    # ---- destination ------------------------------------------------------------------

    async def prepare(self, placement: Placement, migration_id: str) -> dict[str, int | str]:
        """Layer present, netns with the container's IP and MAC (link down), page server up."""
        await criu.check()
        bundle.ensure_criu_config(self.config.criu_config)
        existing = await self.runc.state(placement.name)
        if existing is not None:
            raise Conflict(f"{placement.name} already exists on {self.config.host}")
        paths = self.mpaths(migration_id)
        port_file = paths.root / "page-server.port"
        await self.containers.ensure_layer(placement.layer)
        cpaths = self.cpaths(placement.name)
        if not cpaths.netns.exists():
            await netns.create(self._network(placement), self.config.bridge, link_up=False)
        if port_file.exists() and (paths.images / "page-server.pid").exists():
            return {"page_server": f"{self.config.address}:{port_file.read_text()}"}
        port = free_port(self.config.address)
        with tracer.start_as_current_span(
            "criu.page_server", attributes={"ferry.listen": f"{self.config.address}:{port}"}
        ):
            await criu.start_page_server(paths.images, self.config.address, port)
        port_file.write_text(str(port))
        return {"page_server": f"{self.config.address}:{port}"}

    async def restore(
        self, placement: Placement, migration_id: str, frozen_at: float, *, sabotage: bool = False
    ) -> dict[str, int | float]:
        name = placement.name
        paths, cpaths = self.mpaths(migration_id), self.cpaths(name)
        state = await self.runc.state(name)
        if state is not None and state.status == "running":
            return {}  # restored by an earlier delivery of this command
        rc = await criu.page_server_result(paths.images, PAGE_SERVER_EXIT_S)
        if rc != 0:
            raise RuntimeFailure(
                f"page server {'still waiting' if rc is None else f'exited {rc}'}:"
                " the pages did not all arrive",
                log_tail=criu.tail(paths.images / "page-server.log"),
            )
        incoming = paths.incoming / "bundle"
        if not incoming.is_dir():
            raise RuntimeFailure("the bundle from the source has not arrived")
        for item in incoming.joinpath("images").iterdir():
            target = paths.images / item.name
            if not target.exists():
                shutil.move(str(item), target)
        if not cpaths.upper.exists():
            cpaths.root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(incoming / "upper"), cpaths.upper)
        shutil.rmtree(cpaths.work, ignore_errors=True)
        lower = await self.containers.ensure_layer(placement.layer)
        await layers.mount_overlay(lower, cpaths.upper, cpaths.work, cpaths.rootfs)
        config = json.loads((incoming / "config.json").read_text())
        config["linux"]["cgroupsPath"] = f"{self.config.cgroup_parent}/{name}"
        config.setdefault("annotations", {})["org.criu.config"] = str(
            bundle.ensure_criu_config(self.config.criu_config)
        )
        cpaths.bundle.mkdir(parents=True, exist_ok=True)
        (cpaths.bundle / "config.json").write_text(json.dumps(config, indent=2))
        # Hold first, then link up, then restore: no packet reaches it before the commit.
        with tracer.start_as_current_span("network.hold"):
            await netlock.hold(cpaths.netns)
            await arun(["ip", "link", "set", netns.host_veth_name(name), "up"])
        if sabotage:
            # Test-only fault: a damaged image makes the real CRIU restore fail.
            (paths.images / "inventory.img").write_bytes(b"ferry: injected fault\n")
        await self._restore(name, paths, cpaths)
        running_at = time.time()
        stats = criu.load_stats(paths.images / "stats-restore")
        return {
            "running_at": running_at,
            "freeze_ms": round((running_at - frozen_at) * 1000) if frozen_at else 0,
            "criu_restore_us": stats.get("restore_time", 0),
            "pages_restored": stats.get("pages_restored", 0),
        }

    async def _restore(self, name: str, paths: MigrationPaths, cpaths: ContainerPaths) -> None:
        with tracer.start_as_current_span("criu.restore") as span:
            try:
                await self._runc_restore(name, paths, cpaths)
            except RuntimeFailure as failure:
                _fail(span, failure)
                raise
            stats = criu.load_stats(paths.images / "stats-restore")
            span.set_attribute("criu.restore_time_us", stats.get("restore_time", 0))
            span.set_attribute("criu.pages_restored", stats.get("pages_restored", 0))

    async def _runc_restore(self, name: str, paths: MigrationPaths, cpaths: ContainerPaths) -> None:
        log_file = paths.root / "runc-restore.log"
        proc = await asyncio.create_subprocess_exec(
            *self._runc(
                "restore", "--detach", "--image-path", str(paths.images),
                "--work-path", str(paths.images), "--bundle", str(cpaths.bundle),
                *RUNC_CRIU_FLAGS, name, log_file=log_file,
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
            probe = (
                "import socket,sys;socket.create_connection((sys.argv[1],int(sys.argv[2])),"
                f"{VERIFY_CONNECT_TIMEOUT_S}).close()"
            )
            done = await arun(
                [
                    "nsenter",
                    f"--net={netns_path}",
                    sys.executable,
                    "-c",
                    probe,
                    placement.ip,
                    str(port),
                ],
                check=False,
                timeout=VERIFY_CONNECT_TIMEOUT_S + 5,
            )
            if done.returncode != 0:
                raise RuntimeFailure(f"{placement.name} does not accept connections on port {port}")
        return {"restored_pid": state.pid}

    async def open_network(self, placement: Placement, migration_id: str) -> list[str]:
        """Let clients in, and tell neighbours where the container's MAC lives now:
        a gratuitous ARP for its IPv4 address, unsolicited neighbour advertisements
        for its IPv6 addresses. Returns the addresses announced."""
        with tracer.start_as_current_span("network.cutover") as span:
            announced = await self._cut_over(placement)
            span.set_attribute("ferry.announced", announced)
        shutil.rmtree(self.mpaths(migration_id).root, ignore_errors=True)
        return announced

    async def _cut_over(self, placement: Placement) -> list[str]:
        netns_path = self.cpaths(placement.name).netns
        await netlock.release(netns_path)
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
        """The destination copy goes away (before the commit only)."""
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


def _fail(span: trace.Span, failure: RuntimeFailure) -> None:
    """Mark a span failed, with CRIU's own last words as an event."""
    span.set_status(StatusCode.ERROR, failure.reason)
    span.set_attribute("error.type", type(failure).__name__)
    span.set_attribute("ferry.retryable", failure.retryable)
    if failure.log_tail:
        span.add_event("criu.log", {"lines": failure.log_tail.splitlines()[-20:]})


def container_memory(pid: int) -> int:
    """Resident memory of the container's process tree rooted at `pid`, in bytes."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending.extend(int(c) for c in children)
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
