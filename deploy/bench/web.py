"""A real web server under load while Ferry moves it: Debian's nginx in a Ferry container
(keep-alive connections throughout), and the tiniest one there is, busybox's httpd (a fork
per connection, a few hundred KiB of memory: what the freeze costs when almost nothing is
moved); Debian's wrk outside.

Per server and strategy: the server starts on h1, wrk (`-t2 -c16 --latency --timeout 30s`,
each connection pacing itself, deploy/bench/wrk_report.lua) runs from the root namespace,
the container moves h1 -> h2 and back h2 -> h1, and wrk is stopped (SIGINT: it reports what
it saw).
What counts: wrk's errors (connect, read, write, timeout, non-2xx/3xx status) — for a live
migration every one is a failure — and the longest request, which is the pause a visitor
felt. nginx runs as one process (`master_process off`): a master would drop its workers'
privileges, which needs CAP_SETUID/CAP_SETGID that Ferry's containers do not have.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.workloads import build_binary_rootfs, build_rootfs

NGINX = Path("/usr/sbin/nginx")
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
WEB_PORT = 80
WRK_THREADS, WRK_CONNECTIONS = 2, 16
WRK_TIMEOUT_S = 30  # a request slower than this counts as a timeout error, not a latency
LEAD_S = 2.0  # wrk runs this long before the first move, between the moves and after
MEMORY_MIB = 256
PAGE = "<html><body>" + "ferry " * 150 + "</body></html>\n"  # ~1 KB

NGINX_CONF = f"""\
# make bench: one nginx process (a master's workers would need CAP_SETGID to start),
# keep-alive connections kept for the whole run. It runs as root, who it is: without a user
# nginx looks up "nobody", which the container does not have.
user root root;
daemon off;
master_process off;
error_log stderr warn;
pid /tmp/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type text/html;
    keepalive_timeout 300s;
    keepalive_requests 1000000000;
    server {{ listen {WEB_PORT}; root /www; }}
}}
"""
NGINX_ARGS = (str(NGINX), "-c", "/etc/nginx/bench.conf")
HTTPD_ARGS = ("/bin/busybox", "httpd", "-f", "-p", str(WEB_PORT), "-h", "/www")


def build_web_rootfs(target: Path) -> Path:
    """busybox, Debian's nginx with its libraries, its config and one page."""
    build_binary_rootfs(target, [NGINX])
    (target / "etc" / "group").write_text("root:x:0:\n")
    for d in ("etc/nginx", "www", "var/lib/nginx", "var/log/nginx"):
        (target / d).mkdir(parents=True, exist_ok=True)
    (target / "etc" / "nginx" / "bench.conf").write_text(NGINX_CONF)
    (target / "www" / "index.html").write_text(PAGE)
    return target


def build_httpd_rootfs(target: Path) -> Path:
    """Static busybox (its httpd) and one page."""
    build_rootfs(target)
    (target / "www").mkdir(exist_ok=True)
    (target / "www" / "index.html").write_text(PAGE)
    return target


@dataclass(frozen=True)
class WebServer:
    """What runs in the container: a label for the tables, a key for names (its container,
    its rootfs directory), its command and rootfs."""

    label: str
    key: str
    args: tuple[str, ...]
    build_rootfs: Callable[[Path], Path]
    memory_mib: int = MEMORY_MIB
    pace_ms: float | None = None  # None: the bench's --web-pace-ms


NGINX_SERVER = WebServer("nginx", "nginx", NGINX_ARGS, build_web_rootfs)
# busybox's httpd forks a process per request and closes the connection: paced slower
# (16 connections, 800 forks a second), or the forks, not the move, would fill the 2 cores.
HTTPD_SERVER = WebServer(
    "busybox httpd", "httpd", HTTPD_ARGS, build_httpd_rootfs, memory_mib=64, pace_ms=20.0
)
WEB_SERVERS = (NGINX_SERVER, HTTPD_SERVER)


@dataclass
class WebMove:
    """One move of the web server, as the record tells it."""

    source: str
    destination: str
    state: str = "not run"
    migration_id: str | None = None
    freeze_ms: float | None = None  # first frozen instant -> the destination's network open
    slices_ms: dict[str, float] = field(default_factory=dict)  # the freeze, step by step
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class WebRun:
    """wrk's view of one strategy's two moves."""

    strategy: str
    server: str = NGINX_SERVER.label
    ok: bool = False
    error: str | None = None
    wrk: dict[str, Any] = field(default_factory=dict)  # wrk_report.lua's JSON
    errors: dict[str, int] = field(default_factory=dict)
    error_total: int = 0
    longest_request_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    seconds: float | None = None
    moves: list[WebMove] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wait_for_http(ip: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{ip}:{WEB_PORT}/", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the web server at {ip} did not answer within {timeout:.0f}s")
        time.sleep(0.2)


def start_wrk(ip: str, pace_ms: float, seconds: float = 3600) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [WRK, f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{int(seconds)}s", "--latency",
         "--timeout", f"{WRK_TIMEOUT_S}s", "-s", str(WRK_SCRIPT), f"http://{ip}:{WEB_PORT}/"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PACE_MS": f"{pace_ms:g}"},
    )  # fmt: skip


def stop_wrk(proc: subprocess.Popen[str]) -> tuple[dict[str, Any] | None, str]:
    """SIGINT: wrk stops, prints its summary and our JSON line. Returns (JSON, its output)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    for line in reversed(out.splitlines()):
        if line.startswith('{"requests"'):
            with contextlib.suppress(ValueError):
                return dict(json.loads(line)), out
    return None, out


def read_wrk(run: WebRun, report: dict[str, Any]) -> None:
    run.wrk = report
    run.errors = {k: int(v) for k, v in report["errors"].items()}
    run.error_total = sum(run.errors.values())
    run.requests = int(report["requests"])
    run.seconds = round(report["duration_us"] / 1e6, 2)
    run.longest_request_ms = round(report["latency_us"]["max"] / 1000, 1)
    run.p99_ms = round(report["latency_us"]["p99"] / 1000, 1)


def web_moves(
    server: WebServer,
    strategy: str,
    rootfs: Path,
    run_container: Callable[[str, Path, int, list[str]], str],
    migrate: Callable[[str, str, str], WebMove],
    remove: Callable[[str], None],
    pace_ms: float,
    hosts: tuple[str, str] = ("h1", "h2"),
) -> WebRun:
    """`server` (in `rootfs`) on hosts[0] under wrk, moved there and back with `strategy`.
    The callables are the bench's Ferry commands (container run -> IP, migrate -> WebMove,
    container rm)."""
    run = WebRun(strategy, server=server.label)
    name = f"web-{server.key}-{strategy}"
    ip = run_container(name, rootfs, server.memory_mib, list(server.args))
    wrk: subprocess.Popen[str] | None = None
    try:
        wait_for_http(ip)
        wrk = start_wrk(ip, pace_ms if server.pace_ms is None else server.pace_ms)
        time.sleep(LEAD_S)
        for source, destination in (hosts, hosts[::-1]):
            move = migrate(name, destination, strategy)
            move.source = source
            run.moves.append(move)
            time.sleep(LEAD_S)
            if move.state != "completed":
                run.error = f"move {source}->{destination}: {move.state}"
                break
        report, output = stop_wrk(wrk)
        wrk = None
        if report is None:
            run.error = f"wrk gave no report: {output.strip()[-300:]}"
            return run
        read_wrk(run, report)
        run.ok = run.error is None and run.error_total == 0
        if run.error is None and run.error_total:
            run.error = f"wrk errors: {run.errors}"
    finally:
        if wrk is not None:
            wrk.kill()
            wrk.wait()
        remove(name)
    return run


def web_table(runs: list[WebRun]) -> str:
    head = (
        f"{'web':<14}{'strategy':<15}{'requests':>10}{'errors':>8}"
        f"  {'connect/read/write/timeout/status':<34}"
        f"{'longest ms':>11}{'p99 ms':>8}  freeze per move (ms)"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        e = r.errors
        detail = "/".join(
            str(e.get(k, "-")) for k in ("connect", "read", "write", "timeout", "status")
        )
        freezes = ", ".join(
            f"{m.source}->{m.destination} {m.freeze_ms:.0f}" if m.freeze_ms is not None
            else f"{m.source}->{m.destination} {m.state}"
            for m in r.moves
        )  # fmt: skip
        lines.append(
            f"{r.server:<14}{r.strategy:<15}{r.requests:>10}{r.error_total if r.wrk else '-':>8}"
            f"  {detail:<34}"
            f"{r.longest_request_ms if r.longest_request_ms is not None else '-':>11}"
            f"{r.p99_ms if r.p99_ms is not None else '-':>8}  {freezes}"
            + ("" if r.ok else f"  FAILED: {r.error}")
        )
    sliced = [(r, m) for r in runs for m in r.moves if m.slices_ms]
    if sliced:
        lines.append("the freeze of each move, step by step (ms; hops: the saga between steps):")
        for r, m in sliced:
            steps = ", ".join(f"{k} {v:.0f}" for k, v in m.slices_ms.items() if v >= 1)
            lines.append(f"  {r.server} {r.strategy} {m.source}->{m.destination}: {steps}")
    return "\n".join(lines)
