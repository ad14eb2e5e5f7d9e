"""The hand-run baseline: the recipes of docs/recipes.md, with runc and CRIU and no Ferry.

Inside a running lab's hosts (a host = its netns plus its pinned mount namespace, entered
with `nsenter`, never `ip netns exec`: machine facts F9) it builds a runc container by hand —
the same busybox + dirtyapp rootfs, its own runc `--root` under the host's
/var/lib/ferry/baseline/, an external netns file holding eth0 (a veth into the host's br0,
which is bridged to the datacenter, so the same IP and MAC work on every host), stdio
/dev/null — and moves it from one host to the other with one of two recipes:

  page-server  stop-and-copy: `criu page-server` on the destination, `runc checkpoint
               --page-server --tcp-established` on the source, the small images copied over
               TCP, CRIU's lock chain installed on the destination (F8), link up,
               `runc restore -d`.
  lazy-pages   post-copy: `runc checkpoint --lazy-pages --page-server --status-fd` on the
               source, images copied, `criu lazy-pages --page-server` + `runc restore -d
               --lazy-pages` on the destination; the source serves the pages until all moved.

Same flags as Ferry: every runc and CRIU command line comes from Ferry's own builders
(services/runtime/cmdlines.py) and the container's CRIU config file from bundle.py's
(skip-in-flight; leave-stopped and --leave-running for the lazy dump; CRIU's --tls with the
host's certificate when the lab has them, as Ferry's hosts do). The image copy speaks
mutual TLS too on such a lab (Ferry's transfers do). The same clients as Ferry's bench run
throughout (UDP, TCP request/response, TCP push; deploy/bench/client.py). Nothing of Ferry
moves anything here; from Ferry it only reads the lab's layout (lab.json) to find the
hosts, and uses its pure command-line builders.
Its address (.254) is above Ferry's pool, its veth (`fbl…`) and directories are not Ferry's,
so Ferry's leftover collector never touches them. Everything it made is removed afterwards,
also on failure.

    python -m deploy.bench.baseline --lab bench --recipe page-server --size 64 --rootfs DIR
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from deploy.bench.client import MODES, ClientError, Clients, Mode, PingReport
from deploy.lab.layout import HOST_ETC_MOUNT, HOST_STATE_MOUNT, LabLayout, LabSpec, read_spec
from services.certificates import CA_CERT
from services.runtime import bundle as ferry_bundle
from services.runtime import cmdlines
from services.tls import TlsFiles

Recipe = Literal["page-server", "lazy-pages"]
RECIPES: tuple[Recipe, ...] = ("page-server", "lazy-pages")

REPO = Path(__file__).resolve().parents[2]
CRIU = cmdlines.CRIU  # the binary Ferry's hosts run
BASE = HOST_STATE_MOUNT / "baseline"  # as the host sees it
IP_OFFSET = 254  # above Ferry's container pool (100-250)
VETH = "fblv0"  # Ferry's own veths are "vf" + digest; its collector removes only those
APP_PORT = 7200
PAGE_PORT = 17201  # the destination's page server, or the source's lazy-pages server
COPY_PORT = 17202  # the image copy
RAW_PORT = 17203  # the raw TCP yardstick
CRIU_MARK = "0xC114"
PIPE_MAX_NEEDED = 4194304  # machine facts F4: the source's page server must grow its pipe
CLIENT_LEAD_S = 1.0  # the client runs this long before and after the move


class BaselineError(Exception):
    """A step of the hand-run recipe failed; the message names the step and the tool's words."""


# ---- the lab's hosts ------------------------------------------------------------------------


@dataclass(frozen=True)
class HandRunc:
    """runc as the baseline runs it: the host's binary with the baseline's own state root."""

    root: Path
    binary: str = "runc"


@dataclass(frozen=True)
class Hosts:
    """The lab's hosts as this script uses them (read from lab.json, nothing else of Ferry)."""

    layout: LabLayout
    spec: LabSpec

    @classmethod
    def load(cls, lab: str) -> Hosts:
        layout = LabLayout(lab)
        spec = read_spec(layout)
        if spec is None:
            raise BaselineError(f"lab {lab!r} is not up (no {layout.lab_file})")
        if spec.segmented:
            raise BaselineError("the baseline needs a lab on one datacenter bridge (no segments)")
        return cls(layout, spec)

    def prefix(self, host: str) -> list[str]:
        """Run a command on `host`: its network and its mount namespace (machine facts F9)."""
        return [
            "nsenter",
            f"--net={self.layout.netns_path(host)}",
            f"--mount={self.layout.mntns_path(host)}",
            "--",
        ]

    def address(self, host: str) -> str:
        """Where the other host reaches it (management network, as Ferry's own transfers)."""
        return self.spec.mgmt_address(host)

    def tls(self, host: str) -> TlsFiles | None:
        """The host's TLS files as the host sees them (its agent.toml's [tls]), or None on
        a lab whose transfers go in the clear."""
        if self.spec.plain_transfers:
            return None
        return TlsFiles(
            ca=HOST_ETC_MOUNT / CA_CERT,
            cert=HOST_ETC_MOUNT / f"{host}.pem",
            key=HOST_ETC_MOUNT / f"{host}.key",
        )

    def outside(self, host: str, inside: Path) -> Path:
        """The root namespace's view of a path under the host's /var/lib/ferry."""
        return self.layout.state_dir(host) / inside.relative_to(HOST_STATE_MOUNT)

    def run(
        self, host: str, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.prefix(host), *argv], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout, cwd=REPO,
        )  # fmt: skip
        if check and done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise BaselineError(
                f"{host}: {shlex.join(argv)[:200]} exited {done.returncode}:"
                f" {said[-1] if said else 'no output'}"
            )
        return done

    def sh(self, host: str, script: str, timeout: float = 60.0) -> None:
        self.run(host, ["sh", "-ec", script], timeout=timeout)

    def start(
        self, host: str, argv: Sequence[str], log: Path | None, pass_fds: tuple[int, ...] = ()
    ) -> Proc:
        """Start a host command in its own process group (so it can be ended, children
        included, by its id). Without a log its stdio is /dev/null: runc hands its own stdio
        to the container, and CRIU can dump nothing else (machine facts F2)."""
        with open(log or os.devnull, "ab") as out:
            popen = subprocess.Popen(
                [*self.prefix(host), *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, pass_fds=pass_fds, start_new_session=True, cwd=REPO,
            )  # fmt: skip
        label = f"{host}: {Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}"
        return Proc(label, popen, log)


@dataclass
class Proc:
    """A background host command."""

    label: str
    popen: subprocess.Popen[bytes]
    log: Path | None

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise BaselineError(f"{self.label} still runs after {timeout:.0f}s") from exc

    def end(self) -> None:
        """SIGKILL its process group (runc's CRIU child included)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace").strip() if self.log else ""
        except OSError:
            return ""


def wait_status_fd(read_fd: int, proc: Proc, timeout: float) -> None:
    """CRIU writes one \\0 byte to its --status-fd when it is ready."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BaselineError(f"{proc.label} not ready after {timeout:.0f}s")
            ready, _, _ = select.select([read_fd], [], [], min(left, 0.5))
            if ready:
                byte = os.read(read_fd, 1)
                if byte == b"\0":
                    return
                raise BaselineError(f"{proc.label} exited before it was ready: {proc.output()}")
            if proc.popen.poll() is not None:
                raise BaselineError(
                    f"{proc.label} exited {proc.popen.returncode}: {proc.output()[-300:]}"
                )
    finally:
        os.close(read_fd)


def start_with_status(
    hosts: Hosts, host: str, argv: Callable[[int], list[str]], log: Path, timeout: float
) -> Proc:
    """Start `argv(status_fd)` on `host` and return once it wrote its ready byte."""
    read_fd, write_fd = os.pipe()
    try:
        proc = hosts.start(host, argv(write_fd), log, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    try:
        wait_status_fd(read_fd, proc, timeout)
    except BaseException:
        proc.end()
        raise
    return proc


# ---- the app --------------------------------------------------------------------------------


def app_request(ip: str, message: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """One datagram to dirtyapp and its JSON answer ("S" status, "C" full check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(message, (ip, APP_PORT))
        data, _ = s.recvfrom(4096)
    return dict(json.loads(data))


def wait_until_touched(ip: str, size_mib: int, timeout: float) -> dict[str, Any]:
    """dirtyapp binds its port only after touching every page: its first answer means ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = app_request(ip, b"S\n", timeout=1.0)
            if status.get("pages") == size_mib * 256:
                return status
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise BaselineError(f"dirtyapp at {ip} did not answer within {timeout:.0f}s")
        time.sleep(0.2)


def app_args(size_mib: int, dirty_mib_s: float) -> list[str]:
    return ["/bin/dirtyapp", str(APP_PORT), str(size_mib), f"{dirty_mib_s:g}"]


# ---- one hand-run container -----------------------------------------------------------------


def oci_config(
    name: str, args: list[str], netns: Path, cgroups_path: str, memory_mib: int, criu_config: Path
) -> dict[str, Any]:
    """A plain runc spec: own pid/ipc/uts/mount namespaces, an external netns (machine facts
    F2), and the CRIU config file runc hands to CRIU (as Ferry's containers have)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "annotations": {"org.criu.config": str(criu_config)},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": name,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": memory_mib << 20},
            },
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": str(netns)},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
        },
    }


@dataclass
class Timeline:
    """Monotonic marks, reported in seconds from the first."""

    marks: dict[str, float] = field(default_factory=dict)
    epoch: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic()
        self.epoch[what] = time.time()

    def since(self, start: str, end: str) -> float:
        return self.marks[end] - self.marks[start]

    def relative(self) -> dict[str, float]:
        first = min(self.marks.values(), default=0.0)
        return {k: round(v - first, 4) for k, v in self.marks.items()}


@dataclass
class BaselineResult:
    """One hand-run move, as measured."""

    recipe: Recipe
    size_mib: int
    ok: bool
    error: str | None = None
    client: dict[str, Any] | None = None
    pause_ms: float | None = None  # the UDP client's
    tcp_pause_ms: float | None = None  # the TCP request/response client's
    push_pause_ms: float | None = None  # the TCP push client's
    reconnects: int = 0  # TCP clients' reconnects: any is a failure
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # by mode
    tls: bool = False  # CRIU's page stream and the image copy over TLS
    pause_from_freeze_s: float | None = None  # where the longest gap began, after the freeze
    # CRIU's frozen_time: a page-server dump's freeze; for a lazy dump it runs until the
    # last page was served (the source waits stopped): no pause anyone feels.
    criu_frozen_ms: float | None = None
    criu_freezing_ms: float | None = None
    criu_memdump_ms: float | None = None
    criu_stats: dict[str, int] = field(default_factory=dict)
    freeze_to_running_ms: float | None = None
    total_s: float | None = None
    transfer_s: float | None = None
    pages_bytes: int = 0
    images_bytes: int = 0
    bytes_moved: int = 0
    rate_mib_s: float | None = None
    stream_mib_s: float | None = None  # page bytes / CRIU's memdump time (memwrite within)
    app_after: dict[str, Any] | None = None
    timeline_s: dict[str, float] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HandRun:
    """One container, made by hand on `source`, moved to `destination`, then removed."""

    def __init__(
        self,
        hosts: Hosts,
        recipe: Recipe,
        rootfs: Path,
        size_mib: int,
        memory_mib: int,
        dirty_mib_s: float,
        source: str = "h1",
        destination: str = "h2",
    ) -> None:
        self.hosts, self.recipe, self.rootfs = hosts, recipe, rootfs
        self.size_mib, self.memory_mib, self.dirty_mib_s = size_mib, memory_mib, dirty_mib_s
        self.src, self.dst = source, destination
        self.name = f"fbl-{'ps' if recipe == 'page-server' else 'lp'}-{size_mib}"
        self.dir = BASE / self.name  # the same path on both hosts, each its own
        self.runc_root = BASE / "runc"
        self.netns = self.dir / "netns"
        self.images = self.dir / "images"
        self.bundle = self.dir / "bundle"
        self.criu_config = self.dir / "criu.conf"
        spec = hosts.spec
        self.ip = str(spec.subnet.network_address + IP_OFFSET)
        packed = ipaddress.IPv4Address(self.ip).packed
        self.mac = "02:fd:" + ":".join(f"{b:02x}" for b in packed)
        self.procs: list[Proc] = []
        self.timeline = Timeline()
        self.rt = HandRunc(root=self.runc_root)

    # -- helpers --

    def out(self, host: str, path: Path) -> Path:
        return self.hosts.outside(host, path)

    def cgroups_path(self, host: str) -> str:
        return f"{self.hosts.layout.cgroup_parent(host)}/{self.name}"

    def runc(self, *args: str, log: str) -> list[str]:
        return cmdlines.runc(self.rt, *args, log_file=self.dir / log)

    def tls_args(self, host: str) -> list[str]:
        """tcpcopy's --tls with the host's own files, where the lab has them."""
        tls = self.hosts.tls(host)
        return ["--tls", str(tls.ca), str(tls.cert), str(tls.key)] if tls else []

    def step(self, host: str, argv: list[str], timeout: float) -> int:
        """Run one command of the recipe to its end; it is ended with its children (runc's
        CRIU) if it overstays, or if anything fails meanwhile."""
        proc = self.hosts.start(host, argv, None)
        self.procs.append(proc)
        return proc.wait(timeout)

    def runc_errors(self, host: str, log: str) -> str:
        found = []
        with contextlib.suppress(OSError):
            for line in self.out(host, self.dir / log).read_text().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("level") in ("error", "fatal"):
                        found.append(" ".join(str(entry.get("msg", "")).split()))
        return found[-1] if found else "(no runc error logged)"

    def criu_errors(self, host: str, log: str) -> str:
        with contextlib.suppress(OSError):
            lines = self.out(host, self.images / log).read_text(errors="replace").splitlines()
            errors = [ln for ln in lines if "Error" in ln][-3:]
            return " | ".join(errors or lines[-2:])
        return f"(no {log})"

    # -- building it --

    def stage(self, host: str, config_netns: Path) -> None:
        """The bundle (same rootfs, this host's cgroup) and an empty images dir."""
        outside = self.out(host, self.dir)
        shutil.rmtree(outside, ignore_errors=True)
        (outside / "images").mkdir(parents=True)
        self.out(host, self.runc_root).mkdir(parents=True, exist_ok=True)
        bundle = self.out(host, self.bundle)
        bundle.mkdir()
        subprocess.run(["cp", "-a", f"{self.rootfs}/.", str(bundle / "rootfs")], check=True)
        config = oci_config(
            self.name,
            app_args(self.size_mib, self.dirty_mib_s),
            config_netns,
            self.cgroups_path(host),
            self.memory_mib,
            self.criu_config,
        )
        (bundle / "config.json").write_text(json.dumps(config, indent=2))
        # Ferry's own file: leave-stopped only for the lazy dump's source (the way back).
        ferry_bundle.ensure_criu_config(
            self.out(host, self.criu_config),
            leave_stopped=self.recipe == "lazy-pages" and host == self.src,
            tls=self.hosts.tls(host),
            ferry_locks_network=False,  # the recipe: CRIU locks, a prelock on the destination
        )

    def make_netns(self, host: str, link_up: bool) -> None:
        """The container's netns file: eth0 with the container's IP and MAC, its peer in br0."""
        spec = self.hosts.spec
        inside = " && ".join(
            [
                "ip link set lo up",
                f"ip link set eth0 address {self.mac}",
                "sysctl -qw net.ipv6.conf.eth0.accept_dad=0",
                f"ip addr add {self.ip}/{spec.subnet.prefixlen} dev eth0",
                "ip link set eth0 up",
                f"ip route add default via {spec.gateway}",
            ]
        )
        self.hosts.sh(
            host,
            f"touch {self.netns}\n"
            f"unshare --net={self.netns} true\n"
            f"ip link add {VETH} type veth peer name eth0 netns {self.netns}\n"
            f"ip link set {VETH} master br0\n"
            + (f"ip link set {VETH} up\n" if link_up else "")
            + f"nsenter --net={self.netns} sh -ec {shlex.quote(inside)}\n",
        )

    def prelock(self, host: str) -> None:
        """CRIU's own lock chain, before the link comes up (machine facts F8); CRIU's restore
        removes it when it finishes."""
        lines = []
        for tool in ("iptables", "ip6tables"):
            ipt = f"nsenter --net={self.netns} {tool} -w"
            lines += [
                f"{ipt} -N CRIU",
                f"{ipt} -A CRIU -m mark --mark {CRIU_MARK} -j ACCEPT",
                f"{ipt} -A CRIU -j DROP",
                f"{ipt} -I INPUT -j CRIU",
                f"{ipt} -I OUTPUT -j CRIU",
            ]
        self.hosts.sh(host, "\n".join(lines))

    def start_container(self) -> None:
        self.stage(self.src, self.netns)
        self.make_netns(self.src, link_up=True)
        argv = self.runc(
            "run", "--detach", "--bundle", str(self.bundle), self.name, log="runc-run.log"
        )
        if self.step(self.src, argv, timeout=60) != 0:
            raise BaselineError(f"runc run: {self.runc_errors(self.src, 'runc-run.log')}")
        wait_until_touched(self.ip, self.size_mib, timeout=60 + self.size_mib / 20)

    # -- moving it --

    def receive_images(self) -> Proc:
        """A receiver on the destination, listening before the freeze."""
        proc = self.hosts.start(
            self.dst,
            [sys.executable, "-m", "deploy.bench.tcpcopy", "recv",
             self.hosts.address(self.dst), str(COPY_PORT), "--extract", str(self.images),
             *self.tls_args(self.dst)],
            self.out(self.dst, self.dir / "copy-recv.log"),
        )  # fmt: skip
        self.procs.append(proc)
        deadline = time.monotonic() + 15
        while "listening" not in proc.output():
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise BaselineError(f"image receiver did not start: {proc.output()[-300:]}")
            time.sleep(0.005)
        return proc

    def send_images(self, receiver: Proc) -> int:
        """tar of the source's images over TCP into the destination's images dir."""
        done = self.hosts.run(
            self.src,
            [sys.executable, "-m", "deploy.bench.tcpcopy", "send",
             self.hosts.address(self.dst), str(COPY_PORT), "--tar", str(self.images),
             *self.tls_args(self.src)],
            timeout=120,
        )  # fmt: skip
        if receiver.wait(60) != 0:
            raise BaselineError(f"image receiver failed: {receiver.output()[-300:]}")
        return int(json.loads(done.stdout.strip().splitlines()[-1])["bytes"])

    def source_link_down(self) -> None:
        """The destination answers for this MAC from now on: one bridge port at a time."""
        self.hosts.run(self.src, ["ip", "link", "set", VETH, "down"])

    def restore(self, *, lazy: bool = False) -> None:
        """Link up (the prelock holds traffic off), restore, tell the bridges where it is."""
        restore = cmdlines.runc_restore(
            self.rt, self.name, self.images, self.bundle, self.dir / "runc-restore.log",
            lazy_pages=lazy,
        )  # fmt: skip
        script = f"ip link set {VETH} up\n{shlex.join(restore)}"
        if self.step(self.dst, ["sh", "-ec", script], timeout=300) != 0:
            raise BaselineError(
                f"runc restore: {self.runc_errors(self.dst, 'runc-restore.log')};"
                f" {self.criu_errors(self.dst, 'restore.log')}"
            )
        self.timeline.mark("running")
        garp = self.hosts.start(
            self.dst,
            ["nsenter", f"--net={self.netns}", "busybox", "arping", "-U", "-c", "1",
             "-I", "eth0", self.ip],
            self.out(self.dst, self.dir / "arping.log"),
        )  # fmt: skip
        self.procs.append(garp)

    def page_server_argv(self, address: str, status_fd: int) -> list[str]:
        """The destination's page server: it takes one dump's pages, then exits."""
        return cmdlines.criu_page_server(
            self.images, address, PAGE_PORT, status_fd=status_fd, tls=self.hosts.tls(self.dst)
        )

    def lazy_checkpoint_argv(self, address: str, status_fd: int) -> list[str]:
        """The source's dump that keeps the pages and serves them (from 0.0.0.0, whatever
        address it is given)."""
        argv = cmdlines.runc_checkpoint(
            self.rt, self.name, self.images, self.dir / "runc-checkpoint.log",
            page_server=f"{address}:{PAGE_PORT}", lazy_pages=True,
        )  # fmt: skip
        return [str(status_fd) if arg == cmdlines.STATUS_FD else arg for arg in argv]

    def lazy_pages_argv(self, source_address: str, status_fd: int) -> list[str]:
        """The destination's daemon that pulls the pages the restored process needs."""
        argv = cmdlines.criu_lazy_pages(
            self.images, source_address, PAGE_PORT, tls=self.hosts.tls(self.dst)
        )
        return [str(status_fd) if arg == cmdlines.STATUS_FD else arg for arg in argv]

    def move_page_server(self) -> tuple[int, int]:
        """Stop-and-copy through a page server. Returns (page bytes, image bytes)."""
        t = self.timeline
        t.mark("start")
        self.stage(self.dst, self.netns)
        self.make_netns(self.dst, link_up=False)
        self.prelock(self.dst)
        dst_addr = self.hosts.address(self.dst)
        page_server = start_with_status(
            self.hosts, self.dst, lambda fd: self.page_server_argv(dst_addr, fd),
            self.out(self.dst, self.dir / "page-server.out"), timeout=15,
        )  # fmt: skip
        self.procs.append(page_server)
        receiver = self.receive_images()
        t.mark("prepared")
        t.mark("freeze")
        checkpoint = cmdlines.runc_checkpoint(
            self.rt, self.name, self.images, self.dir / "runc-checkpoint.log",
            page_server=f"{dst_addr}:{PAGE_PORT}",
        )  # fmt: skip
        if self.step(self.src, checkpoint, timeout=600) != 0:
            raise BaselineError(
                f"runc checkpoint: {self.runc_errors(self.src, 'runc-checkpoint.log')};"
                f" {self.criu_errors(self.src, 'dump.log')}"
            )
        t.mark("dumped")
        self.source_link_down()
        image_bytes = self.send_images(receiver)
        if page_server.wait(30) != 0:
            raise BaselineError(
                f"page server exited {page_server.popen.returncode}:"
                f" {self.criu_errors(self.dst, 'page-server.log')}"
            )
        t.mark("copied")
        self.restore()
        stats = dump_stats(self.out(self.src, self.images / "stats-dump"))
        t.mark("done")
        return int(stats.get("pages_written", 0)) * 4096, image_bytes

    def move_lazy_pages(self) -> tuple[int, int]:
        """Post-copy: restore first, pages follow on demand and in the background."""
        check_pipe_max()
        t = self.timeline
        t.mark("start")
        self.stage(self.dst, self.netns)
        self.make_netns(self.dst, link_up=False)
        self.prelock(self.dst)
        receiver = self.receive_images()
        src_addr = self.hosts.address(self.src)
        t.mark("prepared")
        t.mark("freeze")
        checkpoint = start_with_status(
            self.hosts, self.src, lambda fd: self.lazy_checkpoint_argv(src_addr, fd),
            self.out(self.src, self.dir / "checkpoint.out"), timeout=120,
        )  # fmt: skip
        self.procs.append(checkpoint)
        t.mark("dumped")
        self.source_link_down()
        image_bytes = self.send_images(receiver)
        t.mark("copied")
        lazy = start_with_status(
            self.hosts, self.dst, lambda fd: self.lazy_pages_argv(src_addr, fd),
            self.out(self.dst, self.dir / "lazy-pages.out"), timeout=15,
        )  # fmt: skip
        self.procs.append(lazy)
        self.restore(lazy=True)
        deadline = 60 + self.size_mib / 10
        if lazy.wait(deadline) != 0:
            raise BaselineError(
                f"lazy-pages daemon exited {lazy.popen.returncode}:"
                f" {self.criu_errors(self.dst, 'lazy-pages.log')}"
            )
        if checkpoint.wait(30) != 0:
            raise BaselineError(
                f"runc checkpoint --lazy-pages exited {checkpoint.popen.returncode}:"
                f" {self.runc_errors(self.src, 'runc-checkpoint.log')}"
            )
        t.mark("done")
        # stats-dump is not usable after a lazy dump (its counters are reset by the lazy page
        # server, frozen_time wraps): the lazy page count comes from dump.log instead.
        facts = dump_log_facts(self.out(self.src, self.images / "dump.log"))
        return facts["pages_lazy"] * 4096, image_bytes

    # -- removing it --

    def cleanup(self) -> list[str]:
        """Remove everything this run made, on both hosts; returns what would not go."""
        problems: list[str] = []
        for proc in reversed(self.procs):
            proc.end()
        for host in (self.src, self.dst):
            self._thaw_and_kill(host)
            self.hosts.run(
                host, ["runc", "--root", str(self.runc_root), "delete", "--force", self.name],
                check=False,
            )  # fmt: skip
            self.hosts.run(host, ["ip", "link", "del", VETH], check=False)
            for mount in self._mounts_under(host, self.dir):
                self.hosts.run(host, ["umount", "--lazy", mount], check=False)
            shutil.rmtree(self.out(host, self.dir), ignore_errors=True)
            self._remove_cgroups(host)
            runc_root = self.out(host, self.runc_root)
            shutil.rmtree(runc_root / self.name, ignore_errors=True)
            for empty in (runc_root, runc_root.parent):  # only if no other run uses them
                with contextlib.suppress(OSError):
                    empty.rmdir()
            problems += self._leftovers(host)
        return problems

    def _cgroup_dirs(self, host: str) -> list[Path]:
        rel = self.cgroups_path(host).lstrip("/")
        root = Path("/sys/fs/cgroup")
        dirs = [root / rel] + [h / rel for h in root.iterdir() if h.is_dir()]
        return [d for d in dirs if d.is_dir()]

    def _thaw_and_kill(self, host: str) -> None:
        """A task frozen by a killed CRIU takes no SIGKILL until thawed."""
        for cg in self._cgroup_dirs(host):
            with contextlib.suppress(OSError):
                (cg / "freezer.state").write_text("THAWED")
        for cg in self._cgroup_dirs(host):
            with contextlib.suppress(OSError, ValueError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)

    def _remove_cgroups(self, host: str) -> None:
        for _ in range(50):
            left = self._cgroup_dirs(host)
            for cg in left:
                for sub in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    cg.rmdir()
            if not self._cgroup_dirs(host):
                return
            time.sleep(0.1)

    def _mounts_under(self, host: str, top: Path) -> list[str]:
        """Mount points under `top` in the host's mount namespace, deepest first."""
        done = self.hosts.run(host, ["cat", "/proc/self/mountinfo"], check=False)
        found = set()
        for line in done.stdout.splitlines():
            target = line.split()[4].replace("\\040", " ")
            if target == str(top) or target.startswith(f"{top}/"):
                found.add(target)
        return sorted(found, key=lambda p: p.count("/"), reverse=True)

    def _leftovers(self, host: str) -> list[str]:
        left = [f"{host}: mount {m}" for m in self._mounts_under(host, self.dir)]
        for path in (self.dir, self.runc_root / self.name):
            if self.out(host, path).exists():
                left.append(f"{host}: {path}")
        if self.hosts.run(host, ["ip", "link", "show", VETH], check=False).returncode == 0:
            left.append(f"{host}: link {VETH}")
        left += [f"{host}: cgroup {cg}" for cg in self._cgroup_dirs(host)]
        return left


def dump_log_facts(path: Path) -> dict[str, int]:
    """What a dump.log says: pages (and lazy pages) per its "Pagemap generated" lines, and
    CRIU's freezing and frozen time in µs (freeze done -> tasks released, as CRIU times it)."""
    facts = {"pages": 0, "pages_lazy": 0, "freezing_time": 0, "frozen_time": 0}
    marks: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, text = line.partition(") ")
        try:
            at = float(stamp.lstrip("("))
        except ValueError:
            continue
        if text.startswith("Pagemap generated:"):
            words = text.split()
            facts["pages"] += int(words[2])
            facts["pages_lazy"] += int(words[4].lstrip("("))
        elif text.startswith("freezing cgroup") or text.startswith("Freezing"):
            marks.setdefault("freezing", at)
        elif text.startswith("freezing processes:") or text.startswith("Seized task"):
            marks.setdefault("frozen", at)
        elif text.startswith("Unfreezing tasks"):
            marks["released"] = at
    if "freezing" in marks and "frozen" in marks:
        facts["freezing_time"] = round((marks["frozen"] - marks["freezing"]) * 1e6)
    if "frozen" in marks and "released" in marks:
        facts["frozen_time"] = round((marks["released"] - marks["frozen"]) * 1e6)
    return facts


def dump_stats(path: Path) -> dict[str, int]:
    """CRIU's stats-dump (freezing_time, frozen_time, memdump_time in µs; pages_*)."""
    import pycriu

    with path.open("rb") as f:
        image = pycriu.images.load(f)
    entry = image["entries"][0]
    section = entry.get("dump", entry)
    return {k: int(v) for k, v in section.items() if isinstance(v, int)}


def check_pipe_max() -> None:
    value = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    if value < PIPE_MAX_NEEDED:
        raise BaselineError(
            f"fs.pipe-max-size is {value}; the lazy-pages source needs {PIPE_MAX_NEEDED}"
            " (docs/machine-facts.md#F4; `make setup` sets it)"
        )


def run_recipe(
    hosts: Hosts,
    recipe: Recipe,
    rootfs: Path,
    size_mib: int,
    memory_mib: int,
    dirty_mib_s: float = 8.0,
    say: Callable[[str], None] = lambda _: None,
    modes: tuple[Mode, ...] = MODES,
) -> BaselineResult:
    """Make the container, move it h1 -> h2 with `recipe` while the clients ask, measure,
    and remove everything — also when a step fails."""
    run = HandRun(hosts, recipe, rootfs, size_mib, memory_mib, dirty_mib_s)
    result = BaselineResult(
        recipe=recipe, size_mib=size_mib, ok=False, tls=hosts.tls(run.src) is not None
    )
    clients: Clients | None = None
    try:
        say(f"baseline {recipe} {size_mib} MiB: starting {run.name} on {run.src} at {run.ip}")
        run.start_container()
        clients = Clients(run.ip, APP_PORT, modes).start()
        time.sleep(CLIENT_LEAD_S)
        say(f"baseline {recipe} {size_mib} MiB: moving {run.src} -> {run.dst}")
        if recipe == "page-server":
            pages_bytes, image_bytes = run.move_page_server()
        else:
            pages_bytes, image_bytes = run.move_lazy_pages()
        time.sleep(CLIENT_LEAD_S)
        reports = clients.stop()
        clients = None
        report: PingReport = reports["udp"]
        result.app_after = app_request(run.ip, b"C\n", timeout=30)
        t = run.timeline
        if recipe == "page-server":
            stats = dump_stats(run.out(run.src, run.images / "stats-dump"))
        else:
            stats = dump_log_facts(run.out(run.src, run.images / "dump.log"))
        result.criu_stats = stats
        result.client = asdict(report)
        result.clients = {mode: asdict(r) for mode, r in reports.items()}
        result.pause_ms = report.longest_gap_ms
        if "tcp" in reports:
            result.tcp_pause_ms = reports["tcp"].longest_gap_ms
        if "push" in reports:
            result.push_pause_ms = reports["push"].longest_gap_ms
        result.reconnects = sum(r.reconnects for r in reports.values())
        if report.gap_start:
            result.pause_from_freeze_s = round(report.gap_start - t.epoch["freeze"], 3)
        result.criu_frozen_ms = stats.get("frozen_time", 0) / 1000
        result.criu_freezing_ms = stats.get("freezing_time", 0) / 1000
        result.criu_memdump_ms = stats.get("memdump_time", 0) / 1000
        result.freeze_to_running_ms = round(t.since("freeze", "running") * 1000, 1)
        result.total_s = round(t.since("start", "done"), 3)
        # Bytes move from the freeze until the images are in (stop-and-copy), or until the
        # last lazy page arrived (post-copy).
        end = "copied" if recipe == "page-server" else "done"
        result.transfer_s = round(t.since("freeze", end), 3)
        result.pages_bytes, result.images_bytes = pages_bytes, image_bytes
        result.bytes_moved = pages_bytes + image_bytes
        result.rate_mib_s = round(result.bytes_moved / 2**20 / result.transfer_s, 1)
        # memwrite (pages onto the wire) runs inside memdump: the longer one is the stream.
        stream_us = max(stats.get("memdump_time", 0), stats.get("memwrite_time", 0))
        if recipe == "page-server" and stream_us:
            result.stream_mib_s = round(pages_bytes / 2**20 / (stream_us / 1e6), 1)
        result.timeline_s = t.relative()
        bad = sum(r.bad for r in reports.values()) + int(result.app_after.get("bad_pages", 0))
        result.ok = bad == 0 and report.replies > 0 and result.reconnects == 0
        if bad:
            result.error = f"memory check failed: {bad} bad replies, {result.app_after}"
        elif result.reconnects:
            resets = [x for r in reports.values() for x in r.resets]
            result.error = f"TCP connection reset: {resets}"
    except (BaselineError, ClientError, OSError, subprocess.SubprocessError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.timeline_s = run.timeline.relative()
    finally:
        if clients is not None:
            clients.kill()
        result.leftovers = run.cleanup()
    if result.leftovers:
        say(f"baseline {recipe}: LEFTOVERS {result.leftovers}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "bench"))
    parser.add_argument("--recipe", choices=RECIPES, default="page-server")
    parser.add_argument("--size", type=int, default=64, help="MiB of touched memory")
    parser.add_argument("--memory", type=int, help="container memory limit in MiB")
    parser.add_argument("--dirty-rate", type=float, default=8.0, help="MiB/s dirtied")
    parser.add_argument("--rootfs", type=Path, required=True, help="busybox + /bin/dirtyapp")
    args = parser.parse_args(argv)
    hosts = Hosts.load(args.lab)
    result = run_recipe(
        hosts, args.recipe, args.rootfs, args.size, args.memory or args.size + 512,
        args.dirty_rate, say=lambda s: print(s, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
