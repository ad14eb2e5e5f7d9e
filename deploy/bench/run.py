"""`make bench`: what the users of a moving container feel, beside the hand-run baseline.

For each size (MiB of touched memory that a writer keeps dirtying) and strategy, --samples
times (default 3), alternating Ferry and the baseline: a dirtyapp container starts on h1 and
moves to h2 with `ferry migrate --strategy S --json` while three clients use it; then the
matching recipe of docs/recipes.md runs by hand on the same lab with the same clients
(stop-and-copy <-> page-server, post-copy <-> lazy-pages: deploy/bench/baseline.py, with
Ferry's own CRIU command lines and config, and TLS exactly where Ferry's hosts use it). The
same bytes are then copied over raw TCP between the same two host namespaces. Beside them:
nginx and busybox's httpd (the tiniest container: what the freeze costs when almost nothing
moves) under wrk, moved h1 -> h2 -> h1 per strategy (deploy/bench/web.py), and the Minecraft
demo's tick gaps per move (deploy/bench/game.py). A figure is the median of its samples,
with their range (min-max) when there are several. It prints the tables, writes them to
--table and everything to --json (with the git revision that ran).

What each column means:
  tcp req      the longest time between two valid replies of a TCP client asking every 1 ms
               on one kept connection (what a request/response user feels)
  tcp push     the longest time between two messages the container writes every 1 ms on one
               kept connection (what a subscriber to a stream feels)
  udp          the longest time between two valid replies of a client asking every 1 ms over
               UDP (no retransmission: it sees the network come back at once)
  freeze       from the first frozen instant (the dump's frozen_at) until the destination's
               network opened (open_network's opened_at; without it, that step's end)
  dump .. cut-over, hops
               the freeze in slices: each saga step's time inside it (cut-over: open_network
               up to the opening) and the hops, the saga handing over between two steps
  base ..      the hand-run baseline's clients and freeze (freeze -> its `runc restore`
               returned: its network open); ratio = Ferry / baseline, medians
  CRIU frozen  CRIU's frozen_time from its statistics. For the lazy-pages recipe it runs until
               the source's last page was served: the source is held stopped, nobody feels it
               ("src held")
  total        Ferry: the record's created_at -> updated_at; baseline: first step -> restored
               (post-copy: last page in)
  MiB/s        bytes moved / the time they were moving (stop-and-copy: dump + transfer;
               post-copy: until every page was pulled); raw: a raw TCP copy of the same bytes
               between the same two namespaces; rate/raw their ratio
  stream/TLS   the page stream (page bytes / CRIU's memdump time) against a memory-to-memory
               copy of the same bytes under the hosts' own TLS (the goal: 0.80 or more)
  forecast     the freeze intake forecast before the move; fc/real, forecast / measured
  web          wrk's errors (connect/read/write/timeout/status) and its longest request
  minecraft    the worst bot's longest gap between two time updates, per move (~1000 ms is
               no pause: the server sends one a second)

A TCP client whose connection is reset or closed reconnects and counts it: that cell fails.

    python -m deploy.bench.run --json bench/results.json --table bench/results-table.txt
        [--sizes 64,512] [--strategies ...] [--samples 3] [--no-web] [--no-minecraft] ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.bench.baseline import (
    APP_PORT,
    CRIU,
    RAW_PORT,
    BaselineError,
    BaselineResult,
    Hosts,
    Recipe,
    app_args,
    app_request,
    run_recipe,
    wait_until_touched,
)
from deploy.bench.client import ClientError, Clients, PingReport
from deploy.bench.game import GameRun, game_table
from deploy.bench.game import play as play_minecraft
from deploy.bench.stats import (
    SLICE_LABELS,
    Spread,
    freeze_slices,
    freeze_window,
    hops_ms,
    span_durations,
    spread,
    step_timings,
)
from deploy.bench.web import WEB_SERVERS, WebMove, WebRun, web_moves, web_table
from deploy.lab.layout import LabLayout, read_spec, validate_lab_name
from deploy.workloads import build_rootfs
from services.errors import InvalidInput

REPO = Path(__file__).resolve().parents[2]
FERRY = str(Path(sys.executable).parent / "ferry")
DIRTYAPP = REPO / "build" / "dirtyapp"
SIZES = (64, 512, 2048)
STRATEGIES = ("stop-and-copy", "post-copy", "pre-copy")
MATCHING: dict[str, Recipe] = {"stop-and-copy": "page-server", "post-copy": "lazy-pages"}
SOURCE, DESTINATION = "h1", "h2"
CLIENT_LEAD_S = 1.0  # the clients run this long before and after each move
RAW_REPEATS = 3
SAMPLES = 3
# Steps that move the container's bytes, by name: the rate is measured over them.
MOVING_STEPS = ("dump", "transfer", "drain_pages")
# Trace spans inside the freeze whose durations the JSON keeps (ferry trace --json).
SPANS = (
    "source.freeze",
    "criu.dump",
    "fs.sync",
    "criu.lazy_pages",
    "criu.restore",
    "network.cutover",
)
WARMUP_CHUNK = 64 << 20
GAME_BOTS = 2
WEB_PACE_MS = 5.0
RUN_ERRORS = (BaselineError, ClientError, OSError, subprocess.SubprocessError, ValueError)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def memory_limit(size_mib: int) -> int:
    """Comfortably above what the app touches (its binary, stack, CRIU's restore)."""
    return size_mib + max(256, size_mib // 4)


def git_revision() -> dict[str, Any]:
    """The commit that ran, and whether tracked files differed from it."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30
            )
            return done.stdout.strip() if done.returncode == 0 else ""
        return ""

    revision = git("rev-parse", "HEAD") or "unknown"
    return {"revision": revision, "dirty": bool(git("status", "--porcelain", "-uno"))}


# ---- the machine ----------------------------------------------------------------------------


def warm_up(size_mib: int) -> float:
    """First touch of guest memory on this VM runs at ~320 MB/s (machine facts F16): touch what the
    runs will use (source, destination, images, baseline) once, untimed. Returns seconds."""
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    want = min((3 * size_mib + 1024) << 20, int(available * 0.6))
    started = time.monotonic()
    block = b"\x5a" * WARMUP_CHUNK
    with mmap.mmap(-1, want) as mem:
        for _ in range(want // WARMUP_CHUNK):
            mem.write(block)
    return time.monotonic() - started


def _first_line(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    return "unknown"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "criu": _first_line([CRIU, "--version"]),
        "runc": _first_line(["runc", "--version"]),
        "python": platform.python_version(),
        "pipe_max_size": int(Path("/proc/sys/fs/pipe-max-size").read_text()),
    }


# ---- raw TCP --------------------------------------------------------------------------------


@dataclass
class RawTcp:
    """A plain TCP copy of `bytes` from the source host's netns to the destination's."""

    bytes: int
    mib_s: float  # the median of the runs
    runs_mib_s: list[float]


def tls_args(hosts: Hosts, host: str) -> list[str]:
    tls = hosts.tls(host)
    return ["--tls", str(tls.ca), str(tls.cert), str(tls.key)] if tls else []


def raw_tcp(hosts: Hosts, nbytes: int, repeats: int = RAW_REPEATS, *, tls: bool = False) -> RawTcp:
    """Memory to memory between the two hosts' namespaces; with `tls`, under the hosts' own
    TLS (what Ferry's page streams and transfers use)."""
    rates = []
    dst_addr = hosts.address(DESTINATION)
    recv_tls = tls_args(hosts, DESTINATION) if tls else []
    send_tls = tls_args(hosts, SOURCE) if tls else []
    for _ in range(repeats):
        receiver = subprocess.Popen(
            [*hosts.prefix(DESTINATION), sys.executable, "-m", "deploy.bench.tcpcopy", "recv",
             dst_addr, str(RAW_PORT), "--discard", *recv_tls],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO,
        )  # fmt: skip
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "listening":
                raise BaselineError(f"raw TCP receiver did not start: {receiver.stderr}")
            sent = hosts.run(
                SOURCE,
                [sys.executable, "-m", "deploy.bench.tcpcopy", "send", dst_addr, str(RAW_PORT),
                 "--bytes", str(nbytes), *send_tls],
                timeout=300,
            )  # fmt: skip
            receiver.wait(30)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        result = json.loads(sent.stdout.strip().splitlines()[-1])
        rates.append(round(result["bytes"] / 2**20 / result["seconds"], 1))
    return RawTcp(bytes=nbytes, mib_s=statistics.median(rates), runs_mib_s=rates)


# ---- Ferry ----------------------------------------------------------------------------------


@dataclass
class FerryRun:
    """One `ferry migrate` of a dirtyapp container, as measured."""

    strategy: str
    size_mib: int
    status: str  # "completed", "unavailable" (exit 2), or the record's state / "error"
    reason: str | None = None
    migration_id: str | None = None
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # each client's report
    pause_ms: float | None = None  # the UDP client's
    tcp_pause_ms: float | None = None  # the TCP request/response client's
    push_pause_ms: float | None = None  # the TCP push client's
    reconnects: int = 0  # TCP clients' reconnects after a reset or EOF: any is a failure
    resets: list[str] = field(default_factory=list)
    pause_from_freeze_s: float | None = None  # where the longest UDP gap began, after frozen_at
    memory_ok: bool | None = None  # no "bad" reply, and every page checks out afterwards
    dump_started_at: float | None = None
    frozen_at: float | None = None  # the first frozen instant (the dump's result)
    opened_at: float | None = None  # the destination's network opened
    opened_from: str | None = None  # which field opened_at came from
    freeze_ms: float | None = None  # frozen_at -> opened_at
    slices_ms: dict[str, float] = field(default_factory=dict)  # the freeze, step by step
    slices_from: str | None = None  # "trace spans" (the workers' own times) or "record steps"
    spans_ms: dict[str, float] = field(default_factory=dict)  # trace spans inside it
    restored_ms: float | None = None  # the record's freeze_ms: freeze -> restored
    criu_frozen_ms: float | None = None
    total_s: float | None = None
    cli_wall_s: float | None = None
    transfer_s: float | None = None
    bytes_moved: int = 0
    rate_mib_s: float | None = None
    steps_ms: dict[str, int | None] = field(default_factory=dict)
    stream_mib_s: float | None = None  # page bytes / CRIU's memdump time (memwrite within)
    strategy_reason: str | None = None
    forecast_ms: float | None = None  # the freeze intake forecast (the record's forecast)
    app_after: dict[str, Any] | None = None
    criu: dict[str, Any] = field(default_factory=dict)  # the trace's criu.dump attributes

    def failure(self) -> str | None:
        """Why this sample does not count, or None."""
        if self.status != "completed":
            return f"{self.status}: {self.reason}"
        if self.memory_ok is False:
            return "MEMORY CHECK FAILED"
        if self.reconnects:
            return f"TCP CONNECTION RESET: {self.resets}"
        return None


def ferry(lab: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], env={**os.environ, "FERRY_LAB": lab}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _last_words(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def trace_spans(lab: str, migration_id: str) -> list[dict[str, Any]]:
    """`ferry trace ID --json`, or nothing when it fails."""
    done = ferry(lab, "trace", migration_id, "--json", timeout=60)
    if done.returncode != 0:
        return []
    try:
        return [s for s in json.loads(done.stdout) if isinstance(s, dict)]
    except ValueError:
        return []


def criu_dump_attributes(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """The attributes of the migration's (last) `criu.dump` span: CRIU's own statistics of
    the freeze (criu.criu_frozen_us, criu.criu_memdump_us, …)."""
    dumps = sorted((s for s in spans if s.get("name") == "criu.dump"), key=lambda s: s["start"])
    return dict(dumps[-1].get("attributes") or {}) if dumps else {}


def _number(mapping: dict[str, Any], suffix: str) -> float | None:
    for key, value in mapping.items():
        if key.endswith(suffix) and isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def moving_window(steps: list[dict[str, Any]]) -> float | None:
    """From the start of the first byte-moving step to the end of the last one."""
    moving = [
        s for s in steps
        if s.get("kind", "forward") == "forward" and s.get("name") in MOVING_STEPS
        and s.get("started_at") and s.get("finished_at")
    ]  # fmt: skip
    if not moving:
        return None
    return float(max(s["finished_at"] for s in moving) - min(s["started_at"] for s in moving))


class FerryBench:
    """Ferry's side of the bench, on one lab."""

    def __init__(self, lab: str, rootfs: Path, dirty_mib_s: float) -> None:
        self.lab, self.rootfs, self.dirty_mib_s = lab, rootfs, dirty_mib_s
        self.idle: tuple[str, str, int] | None = None  # a container no move has touched yet
        self.made = 0

    def run_container(self, name: str, rootfs: Path, memory_mib: int, args: list[str]) -> str:
        """`ferry container run` on the source; its IP."""
        done = ferry(
            self.lab, "container", "run", "--host", SOURCE, "--name", name,
            "--rootfs", str(rootfs), "--memory", str(memory_mib), "--", *args, timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            raise BaselineError(f"ferry container run {name}: {_last_words(done)}")
        return done.stdout.strip().splitlines()[-1]

    def remove(self, name: str) -> None:
        ferry(self.lab, "container", "rm", name, timeout=120)

    def start(self, size_mib: int, strategy: str) -> tuple[str, str]:
        """A fresh container on the source, touched — or the one a refused move left alone."""
        if self.idle is not None and self.idle[2] == size_mib:
            name, ip, _ = self.idle
            self.idle = None
            return name, ip
        self.discard_idle()
        self.made += 1
        name = f"bench-{size_mib}-{strategy}-{self.made}"
        ip = self.run_container(
            name, self.rootfs, memory_limit(size_mib), app_args(size_mib, self.dirty_mib_s)
        )
        try:
            wait_until_touched(ip, size_mib, timeout=60 + size_mib / 20)
        except BaseException:
            self.remove(name)
            raise
        return name, ip

    def discard_idle(self) -> None:
        if self.idle is not None:
            self.remove(self.idle[0])
            self.idle = None

    def migrate(self, size_mib: int, strategy: str) -> FerryRun:
        """Move a fresh container with the clients on it; the container goes afterwards
        (kept only when the move was refused, for the next strategy)."""
        run = FerryRun(strategy=strategy, size_mib=size_mib, status="error")
        name, ip = self.start(size_mib, strategy)
        keep_idle = False
        try:
            clients = Clients(ip, APP_PORT).start()
            try:
                time.sleep(CLIENT_LEAD_S)
                started = time.monotonic()
                done = ferry(
                    self.lab, "migrate", name, "--to", DESTINATION, "--strategy", strategy,
                    "--json",
                )  # fmt: skip
                run.cli_wall_s = round(time.monotonic() - started, 3)
                time.sleep(CLIENT_LEAD_S)
            finally:
                reports = clients.stop()
            if done.returncode == 2:
                run.status = "unavailable"
                try:
                    run.reason = json.loads(done.stdout)["error"]["reason"]
                except (ValueError, KeyError, TypeError):
                    run.reason = _last_words(done)
                keep_idle = True
                return run
            try:
                record = json.loads(done.stdout)
            except ValueError:
                run.reason = f"ferry migrate exited {done.returncode}: {_last_words(done)}"
                return run
            self._read_record(run, record)
            self._read_clients(run, reports)
            with contextlib.suppress(OSError, ValueError):
                run.app_after = app_request(ip, b"C\n", timeout=30)
            bad_pages = int((run.app_after or {}).get("bad_pages", 0))
            bad = sum(r.bad for r in reports.values())
            run.memory_ok = bad == 0 and bad_pages == 0 and run.app_after is not None
            return run
        finally:
            if keep_idle:
                self.idle = (name, ip, size_mib)
            else:
                self.remove(name)

    def move(self, name: str, destination: str, strategy: str) -> WebMove:
        """One move of another workload (the web server), read as a WebMove."""
        done = ferry(self.lab, "migrate", name, "--to", destination, "--strategy", strategy,
                     "--json")  # fmt: skip
        move = WebMove(source="?", destination=destination)
        try:
            record = json.loads(done.stdout)
        except ValueError:
            move.state = f"exit {done.returncode}: {_last_words(done)}"
            return move
        move.record = record
        move.state = str(record.get("state", f"exit {done.returncode}"))
        move.migration_id = record.get("id")
        window = freeze_window(record)
        move.freeze_ms = window.ms if window else None
        if window is not None and move.state == "completed" and move.migration_id:
            steps = [s for s in record.get("steps") or [] if isinstance(s, dict)]
            timed = step_timings(trace_spans(self.lab, move.migration_id))
            move.slices_ms = freeze_slices(timed or steps, window)
        return move

    def _read_clients(self, run: FerryRun, reports: dict[str, PingReport]) -> None:
        run.clients = {mode: asdict(r) for mode, r in reports.items()}
        run.pause_ms = reports["udp"].longest_gap_ms
        run.tcp_pause_ms = reports["tcp"].longest_gap_ms
        run.push_pause_ms = reports["push"].longest_gap_ms
        run.reconnects = sum(r.reconnects for r in reports.values())
        run.resets = [f"{mode}: {x}" for mode, r in reports.items() for x in r.resets]
        udp = reports["udp"]
        if run.frozen_at and udp.gap_start:
            run.pause_from_freeze_s = round(udp.gap_start - run.frozen_at, 3)

    def _read_record(self, run: FerryRun, record: dict[str, Any]) -> None:
        run.migration_id = record.get("id")
        run.status = str(record.get("state"))
        run.reason = record.get("error")
        run.strategy_reason = (record.get("strategy") or {}).get("reason")
        run.forecast_ms = _number(record.get("forecast") or {}, "predicted_ms")
        run.restored_ms = record.get("freeze_ms")
        run.bytes_moved = int(record.get("bytes_moved") or 0)
        if record.get("created_at") and record.get("updated_at"):
            run.total_s = round(record["updated_at"] - record["created_at"], 3)
        steps = [s for s in record.get("steps") or [] if isinstance(s, dict)]
        for s in steps:
            label = s["name"] if s.get("kind", "forward") == "forward" else f"undo {s['name']}"
            run.steps_ms[label] = s.get("duration_ms")
        dump = next((s for s in steps if s.get("name") == "dump" and s.get("started_at")), None)
        if dump is not None:
            run.dump_started_at = float(dump["started_at"])
        window = moving_window(steps)
        if window:
            run.transfer_s = round(window, 3)
            run.rate_mib_s = round(run.bytes_moved / 2**20 / window, 1)
        if run.status != "completed" or not run.migration_id:
            return
        spans = trace_spans(self.lab, run.migration_id)
        run.spans_ms = span_durations(spans, SPANS)
        frozen = freeze_window(record)
        if frozen is not None:
            run.frozen_at, run.opened_at = frozen.frozen_at, frozen.opened_at
            run.opened_from, run.freeze_ms = frozen.opened_from, frozen.ms
            timed = step_timings(spans)
            run.slices_from = "trace spans" if timed else "record steps"
            run.slices_ms = freeze_slices(timed or steps, frozen)
        # CRIU's frozen_time: from the dump's result in the record, else from the trace's
        # dump span. Post-copy's lazy dump has none worth reading (machine facts F15).
        results = record.get("results")
        dumped = results.get("dump") if isinstance(results, dict) else None
        dumped = dumped if isinstance(dumped, dict) else {}
        run.criu = criu_dump_attributes(spans)
        frozen_us = _number(dumped, "criu_frozen_us") or _number(run.criu, "frozen_us")
        run.criu_frozen_ms = round(frozen_us / 1000, 1) if frozen_us else None
        # memwrite (pages onto the wire) runs inside memdump: the longer one is the stream.
        stream_us = max(_number(run.criu, "memdump_us") or 0, _number(run.criu, "memwrite_us") or 0)
        page_bytes = _number(run.criu, "page_bytes")
        if stream_us and page_bytes:
            run.stream_mib_s = round(page_bytes / 2**20 / (stream_us / 1e6), 1)


# ---- one cell: a strategy and a size, N samples of each side ---------------------------------


@dataclass
class Cell:
    strategy: str
    size_mib: int
    ferry: list[FerryRun] = field(default_factory=list)
    baseline: list[BaselineResult] = field(default_factory=list)
    raw: RawTcp | None = None
    raw_tls: RawTcp | None = None  # the same copy under the hosts' TLS


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


# What each side's figures are called in a row, and where they come from.
FERRY_FIGURES: dict[str, Callable[[FerryRun], float | None]] = {
    "tcp_pause_ms": lambda r: r.tcp_pause_ms,
    "push_pause_ms": lambda r: r.push_pause_ms,
    "client_pause_ms": lambda r: r.pause_ms,
    "freeze_ms": lambda r: r.freeze_ms,
    "restored_ms": lambda r: r.restored_ms,
    "criu_frozen_ms": lambda r: r.criu_frozen_ms,
    "total_s": lambda r: r.total_s,
    "bytes_moved": lambda r: r.bytes_moved or None,
    "transfer_s": lambda r: r.transfer_s,
    "rate_mib_s": lambda r: r.rate_mib_s,
    "stream_mib_s": lambda r: r.stream_mib_s,
    "forecast_ms": lambda r: r.forecast_ms,
    # Per sample, forecast over measured freeze: 1.0 is exact, the goal is within 0.75-1.25.
    "forecast_ratio": lambda r: ratio(r.forecast_ms, r.freeze_ms),
}
BASELINE_FIGURES: dict[str, Callable[[BaselineResult], float | None]] = {
    "baseline_tcp_pause_ms": lambda b: b.tcp_pause_ms,
    "baseline_push_pause_ms": lambda b: b.push_pause_ms,
    "baseline_pause_ms": lambda b: b.pause_ms,
    "baseline_freeze_ms": lambda b: b.freeze_to_running_ms,
    "baseline_criu_frozen_ms": lambda b: b.criu_frozen_ms,
    "baseline_total_s": lambda b: b.total_s,
    "baseline_bytes_moved": lambda b: b.bytes_moved or None,
    "baseline_rate_mib_s": lambda b: b.rate_mib_s,
}


def _median(s: Spread | None) -> float | None:
    return s.median if s is not None else None


def row_of(cell: Cell) -> dict[str, Any]:
    """A cell's row: medians under the figures' names, their spreads under "spread",
    every sample as measured under "ferry_samples" and "baseline_samples"."""
    runs, bases = cell.ferry, cell.baseline
    failures = [f for f in (r.failure() for r in runs) if f]
    unavailable = bool(runs) and runs[0].status == "unavailable"
    ok_runs = [r for r in runs if r.failure() is None]
    ok_bases = [b for b in bases if b.ok]
    spreads: dict[str, Spread | None] = {
        key: spread(get(r) for r in ok_runs) for key, get in FERRY_FIGURES.items()
    }
    spreads |= {key: spread(get(b) for b in ok_bases) for key, get in BASELINE_FIGURES.items()}
    slice_names = list(dict.fromkeys(k for r in ok_runs for k in r.slices_ms))
    slices = {k: spread(r.slices_ms.get(k) for r in ok_runs) for k in slice_names}
    raw = cell.raw.mib_s if cell.raw else None
    row: dict[str, Any] = {
        "strategy": cell.strategy,
        "size_mib": cell.size_mib,
        "status": "unavailable" if unavailable else ("failed" if failures else "completed"),
        "reason": runs[0].reason if unavailable else ("; ".join(failures) or None),
        "samples": len(runs),
        "completed": len(ok_runs),
        **{key: _median(s) for key, s in spreads.items()},
        "memory_ok": all(r.memory_ok for r in runs) if runs and not unavailable else None,
        "reconnects": sum(r.reconnects for r in runs),
        "opened_from": sorted({r.opened_from for r in ok_runs if r.opened_from}),
        "slices_from": sorted({r.slices_from for r in ok_runs if r.slices_from}),
        "slices_ms": {k: _median(s) for k, s in slices.items()},
        "hops_ms": _median(spread(hops_ms(r.slices_ms) for r in ok_runs if r.slices_ms)),
        "baseline_recipe": MATCHING.get(cell.strategy),
        "baseline_samples_ok": len(ok_bases),
        "baseline_ok": all(b.ok for b in bases) if bases else None,
        "baseline_tls": bases[0].tls if bases else None,
        "baseline_reconnects": sum(b.reconnects for b in bases),
        "raw_tcp_mib_s": raw,
        "raw_tls_mib_s": cell.raw_tls.mib_s if cell.raw_tls else None,
    }
    row["bytes_moved_mib"] = round((row["bytes_moved"] or 0) / 2**20, 1)
    row["ratio_to_baseline"] = ratio(row["client_pause_ms"], row["baseline_pause_ms"])
    row["tcp_ratio_to_baseline"] = ratio(row["tcp_pause_ms"], row["baseline_tcp_pause_ms"])
    row["push_ratio_to_baseline"] = ratio(row["push_pause_ms"], row["baseline_push_pause_ms"])
    row["freeze_ratio_to_baseline"] = ratio(row["freeze_ms"], row["baseline_freeze_ms"])
    row["rate_to_raw"] = ratio(row["rate_mib_s"], raw)
    row["stream_to_raw"] = ratio(row["stream_mib_s"], raw)
    # The goal's measure: the page stream against a copy under the same encryption.
    row["stream_to_raw_tls"] = ratio(row["stream_mib_s"], row["raw_tls_mib_s"])
    row["baseline_rate_to_raw"] = ratio(row["baseline_rate_mib_s"], raw)
    row["spread"] = {k: s.to_dict() for k, s in spreads.items() if s is not None}
    row["slices_spread"] = {k: s.to_dict() for k, s in slices.items() if s is not None}
    row["ferry_samples"] = [asdict(r) for r in runs]
    row["baseline_samples"] = [b.to_dict() for b in bases]
    row["raw_tcp"] = asdict(cell.raw) if cell.raw else None
    row["raw_tls"] = asdict(cell.raw_tls) if cell.raw_tls else None
    return row


def run_cell(
    bench: FerryBench,
    hosts: Hosts,
    rootfs: Path,
    strategy: str,
    size: int,
    args: argparse.Namespace,
) -> Cell:
    """Ferry, baseline, Ferry, baseline, … `args.samples` of each; then raw TCP once."""
    cell = Cell(strategy, size)
    recipe = None if args.no_baseline else MATCHING.get(strategy)
    for sample in range(1, args.samples + 1):
        say(f"== {strategy}, {size} MiB, sample {sample}/{args.samples}: ferry migrate"
            f" {SOURCE} -> {DESTINATION}")  # fmt: skip
        try:
            moved = bench.migrate(size, strategy)
        except RUN_ERRORS as exc:
            moved = FerryRun(strategy, size, "error", f"{type(exc).__name__}: {exc}")
        cell.ferry.append(moved)
        say(
            f"   {moved.status}: tcp {_fmt(moved.tcp_pause_ms, '.0f')} ms, push"
            f" {_fmt(moved.push_pause_ms, '.0f')} ms, udp {_fmt(moved.pause_ms, '.0f')} ms,"
            f" freeze {_fmt(moved.freeze_ms, '.0f')} ms"
            + (f" ({moved.failure()})" if moved.failure() else "")
        )
        if moved.status == "unavailable":
            break  # refused at intake: another sample would be refused the same way
        if recipe is not None:
            bench.discard_idle()
            base = run_recipe(
                hosts, recipe, rootfs, size, memory_limit(size), args.dirty_rate, say=say
            )
            cell.baseline.append(base)
            say(
                f"   baseline {recipe}: "
                + (
                    f"tcp {_fmt(base.tcp_pause_ms, '.0f')} ms, udp {base.pause_ms:.0f} ms"
                    if base.ok
                    else f"FAILED {base.error}"
                )
            )
    moved_bytes = [r.bytes_moved for r in cell.ferry if r.bytes_moved]
    moved_bytes += [b.bytes_moved for b in cell.baseline if b.bytes_moved]
    if moved_bytes:
        nbytes = int(statistics.median(moved_bytes))
        try:
            cell.raw = raw_tcp(hosts, nbytes)
            say(f"   raw TCP {nbytes / 2**20:.1f} MiB: {cell.raw.mib_s:.0f} MiB/s")
            if hosts.tls(SOURCE) is not None:
                cell.raw_tls = raw_tcp(hosts, nbytes, tls=True)
                say(f"   raw TLS {nbytes / 2**20:.1f} MiB: {cell.raw_tls.mib_s:.0f} MiB/s")
        except (BaselineError, OSError, subprocess.SubprocessError) as exc:
            say(f"   raw TCP failed: {exc}")
    return cell


# ---- tables ---------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _spread(row: dict[str, Any], key: str, spec: str = ".0f", where: str = "spread") -> str:
    found = row.get(where, {}).get(key)
    if found is None:
        return "-"
    return Spread(found["median"], found["min"], found["max"], found["n"]).text(spec)


def _unavailable(row: dict[str, Any]) -> str:
    return f"{row['strategy']:<14}{row['size_mib']:>6}  unavailable: {str(row['reason'])[:90]}"


def felt_table(rows: list[dict[str, Any]]) -> str:
    w = 20
    head = (
        f"{'felt, ms':<14}{'MiB':>6}{'tcp req':>{w}}{'tcp push':>{w}}{'udp':>{w}}{'freeze':>{w}}"
        f"{'base tcp':>10}{'base udp':>10}{'tcp ratio':>10}{'udp ratio':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "unavailable":
            lines.append(_unavailable(r))
            continue
        lines.append(
            f"{r['strategy']:<14}{r['size_mib']:>6}{_spread(r, 'tcp_pause_ms'):>{w}}"
            f"{_spread(r, 'push_pause_ms'):>{w}}{_spread(r, 'client_pause_ms'):>{w}}"
            f"{_spread(r, 'freeze_ms'):>{w}}{_fmt(r['baseline_tcp_pause_ms'], '.0f'):>10}"
            f"{_fmt(r['baseline_pause_ms'], '.0f'):>10}"
            f"{_fmt(r['tcp_ratio_to_baseline'], '.2f'):>10}"
            f"{_fmt(r['ratio_to_baseline'], '.2f'):>10}"
            + ("" if r["status"] == "completed" else f"  FAILED: {r['reason']}")
        )
    return "\n".join(lines)


def slices_table(rows: list[dict[str, Any]]) -> str:
    names = list(SLICE_LABELS)
    head = (
        f"{'freeze, ms':<14}{'MiB':>6}{'freeze':>9}"
        + "".join(f"{SLICE_LABELS[n]:>10}" for n in names)
        + f"{'hops':>8}{'forecast':>10}{'fc/real':>9}  opened_at from; slices from"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "unavailable" or not r["slices_ms"]:
            continue
        lines.append(
            f"{r['strategy']:<14}{r['size_mib']:>6}{_fmt(r['freeze_ms'], '.0f'):>9}"
            + "".join(f"{_fmt(r['slices_ms'].get(n), '.0f'):>10}" for n in names)
            + f"{_fmt(r['hops_ms'], '.0f'):>8}{_fmt(r.get('forecast_ms'), '.0f'):>10}"
            f"{_fmt(r.get('forecast_ratio'), '.2f'):>9}  {', '.join(r['opened_from']) or '-'};"
            f" {', '.join(r['slices_from']) or '-'}"
        )
    return "\n".join(lines)


def baseline_table(rows: list[dict[str, Any]]) -> str:
    w = 20
    head = (
        f"{'baseline':<28}{'MiB':>6}{'tcp req':>{w}}{'tcp push':>{w}}{'udp':>{w}}"
        f"{'freeze':>{w}}{'CRIU frozen':>18}{'total s':>9}{'MiB/s':>8}{'rate/raw':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r["baseline_recipe"] or r["baseline_ok"] is None:
            continue
        label = f"{r['baseline_recipe']} ({r['strategy']})"
        if r["baseline_samples_ok"] == 0:
            failed = [b["error"] for b in r["baseline_samples"] if not b["ok"]]
            lines.append(f"{label:<28}{r['size_mib']:>6}  FAILED: {failed[:1]}")
            continue
        frozen = _spread(r, "baseline_criu_frozen_ms")
        if r["baseline_recipe"] == "lazy-pages":
            frozen = f"{frozen} src held"  # not a pause: the source waits stopped
        lines.append(
            f"{label:<28}{r['size_mib']:>6}{_spread(r, 'baseline_tcp_pause_ms'):>{w}}"
            f"{_spread(r, 'baseline_push_pause_ms'):>{w}}{_spread(r, 'baseline_pause_ms'):>{w}}"
            f"{_spread(r, 'baseline_freeze_ms'):>{w}}{frozen:>18}"
            f"{_fmt(r['baseline_total_s'], '.2f'):>9}{_fmt(r['baseline_rate_mib_s'], '.1f'):>8}"
            f"{_fmt(r['baseline_rate_to_raw'], '.2f'):>9}"
            + ("" if r["baseline_ok"] else "  SOME SAMPLES FAILED")
        )
    return "\n".join(lines)


def throughput_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'ferry':<14}{'MiB':>6}{'restored ms':>13}{'CRIU frozen':>13}{'total s':>9}"
        f"{'moved MiB':>11}{'MiB/s':>8}{'raw MiB/s':>11}{'rate/raw':>10}"
        f"{'stream MiB/s':>14}{'raw TLS':>9}{'stream/TLS':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "unavailable":
            continue
        lines.append(
            f"{r['strategy']:<14}{r['size_mib']:>6}{_fmt(r['restored_ms'], '.0f'):>13}"
            f"{_fmt(r['criu_frozen_ms'], '.0f'):>13}{_fmt(r['total_s'], '.2f'):>9}"
            f"{r['bytes_moved_mib']:>11.1f}{_fmt(r['rate_mib_s'], '.1f'):>8}"
            f"{_fmt(r['raw_tcp_mib_s'], '.0f'):>11}{_fmt(r['rate_to_raw'], '.2f'):>10}"
            f"{_fmt(r['stream_mib_s'], '.0f'):>14}{_fmt(r.get('raw_tls_mib_s'), '.0f'):>9}"
            f"{_fmt(r.get('stream_to_raw_tls'), '.2f'):>11}"
        )
    return "\n".join(lines)


def report_tables(
    rows: list[dict[str, Any]],
    web: list[WebRun],
    game: GameRun | None,
    cost_rows: list[dict[str, Any]],
    header: str,
) -> str:
    parts = [header, felt_table(rows), slices_table(rows)]
    if any(r["baseline_ok"] is not None for r in rows):
        parts.append(baseline_table(rows))
    parts.append(throughput_table(rows))
    if web:
        parts.append(web_table(web))
    if game is not None:
        parts.append(game_table(game))
    if cost_rows:
        parts.append(cost_table(cost_rows))
    return "\n\n".join(parts)


def header_of(info: dict[str, Any], git: dict[str, Any], samples: int, tls: bool) -> str:
    revision = git["revision"][:12] + (" (dirty)" if git["dirty"] else "")
    return (
        f"make bench at {revision}: {info['cpus']} cpus, kernel {info['kernel']},"
        f" CRIU {str(info['criu']).removeprefix('Version: ')}\n"
        f"median (min-max) of {samples} sample(s) per cell, Ferry and the baseline alternating;"
        f" page streams and image transfers {'over TLS' if tls else 'in the clear'} on both"
        " sides (the baseline runs Ferry's own CRIU command lines and config)"
    )


# ---- what encryption costs -------------------------------------------------------------------

ENCRYPTED, PLAIN = "tls", "plain"


def tls_cost(
    benches: dict[str, FerryBench], sizes: list[int], strategies: list[str], samples: int
) -> list[dict[str, Any]]:
    """The same move on a lab whose hosts speak TLS and on one whose transfers and page
    streams go in the clear, alternating (the order swapped every sample), `samples` each."""
    rows = []
    for size in sizes:
        for strategy in (s for s in strategies if s in MATCHING):
            runs: dict[str, list[FerryRun]] = {ENCRYPTED: [], PLAIN: []}
            for sample in range(samples):
                order = (ENCRYPTED, PLAIN) if sample % 2 == 0 else (PLAIN, ENCRYPTED)
                for mode in order:
                    say(f"== tls cost: {strategy}, {size} MiB, {mode} (sample {sample + 1})")
                    try:
                        moved = benches[mode].migrate(size, strategy)
                    except RUN_ERRORS as exc:
                        moved = FerryRun(strategy, size, "error", f"{type(exc).__name__}: {exc}")
                    say(f"   {moved.status}: pause {_fmt(moved.pause_ms, '.0f')} ms")
                    runs[mode].append(moved)
            rows.append(_cost_row(strategy, size, runs))
    return rows


def _cost_row(strategy: str, size: int, runs: dict[str, list[FerryRun]]) -> dict[str, Any]:
    row: dict[str, Any] = {"strategy": strategy, "size_mib": size}
    for mode, done in runs.items():
        ok = [r for r in done if r.failure() is None]
        row[mode] = {
            "samples": len(done),
            "completed": len(ok),
            "pause_ms": _median(spread(r.pause_ms for r in ok)),
            "pause_ms_each": [r.pause_ms for r in done],
            "tcp_pause_ms": _median(spread(r.tcp_pause_ms for r in ok)),
            "freeze_ms": _median(spread(r.freeze_ms for r in ok)),
            "rate_mib_s": _median(spread(r.rate_mib_s for r in ok)),
            "total_s": _median(spread(r.total_s for r in ok)),
        }
    tls_pause, plain_pause = row[ENCRYPTED]["pause_ms"], row[PLAIN]["pause_ms"]
    row["pause_ratio"] = round(tls_pause / plain_pause, 2) if tls_pause and plain_pause else None
    return row


def cost_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'encryption':14} {'MiB':>5} {'pause ms':>17} {'freeze ms':>17} {'MiB/s':>15}"
        f" {'total s':>13} {'ratio':>6}"
    )
    lines = [head, f"{'':14} {'':>5} {'tls / plain':>17} {'tls / plain':>17}"
             f" {'tls / plain':>15} {'tls / plain':>13}", "-" * len(head)]  # fmt: skip

    def pair(key: str, spec: str, row: dict[str, Any], width: int) -> str:
        both = f"{_fmt(row[ENCRYPTED][key], spec)} / {_fmt(row[PLAIN][key], spec)}"
        return f"{both:>{width}}"

    for row in rows:
        lines.append(
            f"{row['strategy']:14} {row['size_mib']:>5} {pair('pause_ms', '.0f', row, 17)}"
            f" {pair('freeze_ms', '.0f', row, 17)} {pair('rate_mib_s', '.0f', row, 15)}"
            f" {pair('total_s', '.2f', row, 13)} {_fmt(row['pause_ratio'], '.2f'):>6}"
        )
    return "\n".join(lines)


# ---- the run --------------------------------------------------------------------------------


def parse_list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--table", type=Path, help="write the tables here")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="MiB, e.g. 64,512")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--samples", type=int, default=SAMPLES, help="moves per cell and side")
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "bench"))
    parser.add_argument("--dirty-rate", type=float, default=8.0, help="MiB/s the app dirties")
    parser.add_argument("--no-baseline", action="store_true", help="skip the hand-run recipes")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--no-web", action="store_true", help="skip the web servers under wrk")
    parser.add_argument(
        "--web-pace-ms",
        type=float,
        default=WEB_PACE_MS,
        help="each wrk connection waits this long between requests (0: flat out)",
    )
    parser.add_argument("--no-minecraft", action="store_true", help="skip the Minecraft demo")
    parser.add_argument("--minecraft-bots", type=int, default=GAME_BOTS)
    parser.add_argument(
        "--tls-cost",
        type=int,
        default=0,
        metavar="SAMPLES",
        help="also move each size SAMPLES times on a lab with TLS and one in the clear,"
        " alternating: what encryption costs",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lab = validate_lab_name(args.lab)
        sizes = [int(s) for s in parse_list(args.sizes)]
    except (InvalidInput, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    strategies = parse_list(args.strategies)
    if not sizes or min(sizes) < 1 or not strategies or args.samples < 1:
        print(
            "bench: --sizes and --strategies must name at least one, --samples be >= 1",
            file=sys.stderr,
        )
        return 2
    plain_lab, game_lab = f"{lab[:6]}pl", f"{lab[:6]}mc"  # short: they prefix interface names
    for name in (lab, plain_lab, game_lab):
        if read_spec(LabLayout(name)) is not None:
            print(
                f"bench: a lab named {name!r} is already up; the bench makes and removes its"
                f" own (use --lab NAME, or `FERRY_LAB={name} ferry lab down`)",
                file=sys.stderr,
            )
            return 2
    subprocess.run(["make", "-C", str(REPO), "-s", "workloads"], check=True)

    info = machine()
    git = git_revision()
    started_at = dt.datetime.now(dt.UTC)
    if not args.no_warmup:
        say(f"warming up memory for {max(sizes)} MiB runs (machine facts F16)")
        info["warmup_s"] = round(warm_up(max(sizes)), 1)
    cells: list[Cell] = []
    web: list[WebRun] = []
    game: GameRun | None = None
    cost_rows: list[dict[str, Any]] = []
    tls = True
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    try:
        rootfs = build_rootfs(tmp / "rootfs")
        shutil.copy2(DIRTYAPP, rootfs / "bin" / "dirtyapp")
        say(f"lab {lab}: 2 hosts")
        up = ferry(lab, "lab", "up", "--hosts", "2", timeout=300)
        if up.returncode != 0:
            raise BaselineError(f"ferry lab up: {_last_words(up)}")
        hosts = Hosts.load(lab)
        tls = hosts.tls(SOURCE) is not None
        bench = FerryBench(lab, rootfs, args.dirty_rate)
        if args.tls_cost:  # up front: a lab that cannot start fails the run before it begins
            say(f"lab {plain_lab}: 2 hosts, transfers in the clear")
            up = ferry(plain_lab, "lab", "up", "--hosts", "2", "--plain-transfers", timeout=300)
            if up.returncode != 0:
                raise BaselineError(f"ferry lab up: {_last_words(up)}")
            plain = FerryBench(plain_lab, rootfs, args.dirty_rate)
        for size in sizes:
            for strategy in strategies:
                cells.append(run_cell(bench, hosts, rootfs, strategy, size, args))
        bench.discard_idle()
        for server in () if args.no_web else WEB_SERVERS:
            web_rootfs = server.build_rootfs(tmp / f"web-{server.key}")
            for strategy in strategies:
                if not any(c.strategy == strategy and c.ferry and c.ferry[0].status
                           != "unavailable" for c in cells):  # fmt: skip
                    continue
                say(f"== web: {server.label} under wrk, {strategy},"
                    f" {SOURCE} -> {DESTINATION} -> {SOURCE}")  # fmt: skip
                try:
                    moved = web_moves(
                        server, strategy, web_rootfs, bench.run_container, bench.move,
                        bench.remove, args.web_pace_ms, (SOURCE, DESTINATION),
                    )  # fmt: skip
                except (*RUN_ERRORS, TimeoutError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    moved = WebRun(strategy, server=server.label, error=error)
                web.append(moved)
                say(
                    f"   errors {moved.error_total}, longest request"
                    f" {_fmt(moved.longest_request_ms)} ms"
                    + ("" if moved.ok else f" FAILED: {moved.error}")
                )
        if args.tls_cost:
            cost_rows = tls_cost({ENCRYPTED: bench, PLAIN: plain}, sizes, strategies, args.tls_cost)
    finally:
        for name in (lab, plain_lab) if args.tls_cost else (lab,):
            say(f"lab {name}: down")
            ferry(name, "lab", "down", timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_minecraft:  # its own lab, after the bench's is gone: no CPU shared
        game_strategies = [s for s in strategies if s in MATCHING]
        say(f"== minecraft: {args.minecraft_bots} bots, lab {game_lab}, {game_strategies}")
        game = play_minecraft(game_lab, args.minecraft_bots, game_strategies, say=say)

    rows = [row_of(c) for c in cells]
    text = report_tables(rows, web, game, cost_rows, header_of(info, git, args.samples, tls))
    print(text)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
        say(f"wrote {args.table}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "date": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git": git,
            "machine": info,
            "config": {
                "sizes_mib": sizes,
                "strategies": strategies,
                "samples": args.samples,
                "dirty_mib_s": args.dirty_rate,
                "client_interval_ms": 1,
                "clients": ["tcp", "push", "udp"],
                "lab": lab,
                "tls": tls,
                "moving_steps": list(MOVING_STEPS),
                "web_pace_ms": None if args.no_web else args.web_pace_ms,
                "minecraft_bots": None if args.no_minecraft else args.minecraft_bots,
            },
            "rows": rows,
            "web": [w.to_dict() for w in web],
            "minecraft": game.to_dict() if game is not None else None,
            "tls_cost": cost_rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        say(f"wrote {args.json}")
    failed = [f"{r['strategy']} {r['size_mib']} MiB: {r['reason']}" for r in rows
              if r["status"] == "failed"]  # fmt: skip
    failed += [f"baseline {r['baseline_recipe']} {r['size_mib']} MiB" for r in rows
               if r["baseline_ok"] is False]  # fmt: skip
    failed += [f"web {w.server} {w.strategy}: {w.error}" for w in web if not w.ok]
    if game is not None and not game.ok and not game.skipped:
        failed.append(f"minecraft: {game.error}")
    failed += [
        f"tls cost {row['strategy']} {row['size_mib']} MiB {mode}"
        for row in cost_rows
        for mode in (ENCRYPTED, PLAIN)
        if row[mode]["completed"] < row[mode]["samples"]
    ]
    for line in failed:
        say(f"FAILED: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
