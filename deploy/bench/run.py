"""`make bench`: Ferry's live migrations measured beside the hand-run baseline and raw TCP.

For each size (MiB of touched memory that a writer keeps dirtying) and each strategy, a
dirtyapp container starts on h1 and moves to h2 with `ferry migrate --strategy S --json`
while a client asks it about a different page every millisecond. Then the matching recipe
of docs/recipes.md runs by hand on the same lab (stop-and-copy <-> page-server, post-copy
<-> lazy-pages: deploy/bench/baseline.py), and the same number of bytes is copied over raw
TCP between the same two host namespaces. It prints a table and writes JSON.

What each column means:
  client pause   the longest time between two valid replies seen by the 1 ms client
  CRIU frozen    CRIU's own frozen_time (source tasks frozen), from its statistics
  total          Ferry: the migration record's created_at -> updated_at (the whole saga);
                 baseline: first preparation step -> restored (post-copy: last page in)
  rate           bytes moved / the time they were moving: from the freeze until the last
                 byte landed (stop-and-copy: dump + transfer; post-copy: until every page
                 was pulled)
  ratio          client pause / the baseline's client pause (same size, matching recipe)
  rate/raw       rate / a raw TCP copy of the same bytes between the same two namespaces

    python -m deploy.bench.run --json bench/results.json [--sizes 64,512] [--strategies …]
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
from deploy.bench.client import ClientError, PingerProcess
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
CLIENT_LEAD_S = 1.0  # the client runs this long before and after each move
RAW_REPEATS = 3
# Steps that move the container's bytes, by name: the rate is measured over them.
MOVING_STEPS = ("dump", "transfer", "drain_pages")
WARMUP_CHUNK = 64 << 20


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def memory_limit(size_mib: int) -> int:
    """Comfortably above what the app touches (its binary, stack, CRIU's restore)."""
    return size_mib + max(256, size_mib // 4)


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


def raw_tcp(hosts: Hosts, nbytes: int, repeats: int = RAW_REPEATS) -> RawTcp:
    rates = []
    dst_addr = hosts.address(DESTINATION)
    for _ in range(repeats):
        receiver = subprocess.Popen(
            [*hosts.prefix(DESTINATION), sys.executable, "-m", "deploy.bench.tcpcopy", "recv",
             dst_addr, str(RAW_PORT), "--discard"],
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
                 "--bytes", str(nbytes)],
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
    client: dict[str, Any] | None = None
    pause_ms: float | None = None
    pause_from_freeze_s: float | None = None  # where the longest gap began, after the dump began
    memory_ok: bool | None = None  # no "bad" reply, and every page checks out afterwards
    dump_started_at: float | None = None
    freeze_ms: float | None = None  # Ferry's own: freeze -> restored on the destination
    criu_frozen_ms: float | None = None
    total_s: float | None = None
    cli_wall_s: float | None = None
    transfer_s: float | None = None
    bytes_moved: int = 0
    rate_mib_s: float | None = None
    steps_ms: dict[str, int | None] = field(default_factory=dict)
    stream_mib_s: float | None = None  # page bytes / CRIU's memdump time (memwrite within)
    strategy_reason: str | None = None
    app_after: dict[str, Any] | None = None
    criu: dict[str, Any] = field(default_factory=dict)  # the trace's criu.dump attributes


def ferry(lab: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], env={**os.environ, "FERRY_LAB": lab}, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _last_words(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"


def criu_dump_attributes(lab: str, migration_id: str) -> dict[str, Any]:
    """The attributes of the migration's (last) `criu.dump` span, from `ferry trace --json`:
    CRIU's own statistics of the freeze (criu.criu_frozen_us, criu.criu_memdump_us, …)."""
    done = ferry(lab, "trace", migration_id, "--json", timeout=60)
    if done.returncode != 0:
        return {}
    try:
        spans = [s for s in json.loads(done.stdout) if isinstance(s, dict)]
    except ValueError:
        return {}
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

    def start(self, size_mib: int, strategy: str) -> tuple[str, str]:
        """A fresh container on the source, touched — or the one a refused move left alone."""
        if self.idle is not None and self.idle[2] == size_mib:
            name, ip, _ = self.idle
            self.idle = None
            return name, ip
        self.discard_idle()
        name = f"bench-{size_mib}-{strategy}"
        done = ferry(
            self.lab, "container", "run", "--host", SOURCE, "--name", name,
            "--rootfs", str(self.rootfs), "--memory", str(memory_limit(size_mib)),
            "--", *app_args(size_mib, self.dirty_mib_s), timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            raise BaselineError(f"ferry container run {name}: {_last_words(done)}")
        ip = done.stdout.strip().splitlines()[-1]
        wait_until_touched(ip, size_mib, timeout=60 + size_mib / 20)
        return name, ip

    def discard_idle(self) -> None:
        if self.idle is not None:
            ferry(self.lab, "container", "rm", self.idle[0], timeout=120)
            self.idle = None

    def migrate(self, size_mib: int, strategy: str) -> FerryRun:
        run = FerryRun(strategy=strategy, size_mib=size_mib, status="error")
        name, ip = self.start(size_mib, strategy)
        keep_idle = False
        client = PingerProcess(ip, APP_PORT).start()
        try:
            time.sleep(CLIENT_LEAD_S)
            started = time.monotonic()
            done = ferry(
                self.lab, "migrate", name, "--to", DESTINATION, "--strategy", strategy, "--json"
            )
            run.cli_wall_s = round(time.monotonic() - started, 3)
            time.sleep(CLIENT_LEAD_S)
        finally:
            report = client.stop()
        if done.returncode == 2:
            run.status = "unavailable"
            try:
                run.reason = json.loads(done.stdout)["error"]["reason"]
            except (ValueError, KeyError, TypeError):
                run.reason = _last_words(done)
            keep_idle = True
        else:
            try:
                record = json.loads(done.stdout)
            except ValueError:
                run.reason = f"ferry migrate exited {done.returncode}: {_last_words(done)}"
                record = None
            if record is not None:
                self._read_record(run, record)
                run.client = asdict(report)
                run.pause_ms = report.longest_gap_ms
                if run.dump_started_at and report.gap_start:
                    run.pause_from_freeze_s = round(report.gap_start - run.dump_started_at, 3)
                with contextlib.suppress(OSError, ValueError):
                    run.app_after = app_request(ip, b"C\n", timeout=30)
                bad_pages = int((run.app_after or {}).get("bad_pages", 0))
                run.memory_ok = report.bad == 0 and bad_pages == 0 and run.app_after is not None
        if keep_idle:
            self.idle = (name, ip, size_mib)
        else:
            ferry(self.lab, "container", "rm", name, timeout=120)
        return run

    def _read_record(self, run: FerryRun, record: dict[str, Any]) -> None:
        run.migration_id = record.get("id")
        run.status = str(record.get("state"))
        run.reason = record.get("error")
        run.strategy_reason = (record.get("strategy") or {}).get("reason")
        run.freeze_ms = record.get("freeze_ms")
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
        # CRIU's frozen_time: from the dump's result in the record, else from the trace's
        # dump span. Post-copy's lazy dump has none worth reading (machine facts F15).
        results = record.get("results")
        dumped = results.get("dump") if isinstance(results, dict) else None
        dumped = dumped if isinstance(dumped, dict) else {}
        run.criu = criu_dump_attributes(self.lab, run.migration_id)
        frozen_us = _number(dumped, "criu_frozen_us") or _number(run.criu, "frozen_us")
        run.criu_frozen_ms = round(frozen_us / 1000, 1) if frozen_us else None
        # memwrite (pages onto the wire) runs inside memdump: the longer one is the stream.
        stream_us = max(_number(run.criu, "memdump_us") or 0, _number(run.criu, "memwrite_us") or 0)
        page_bytes = _number(run.criu, "page_bytes")
        if stream_us and page_bytes:
            run.stream_mib_s = round(page_bytes / 2**20 / (stream_us / 1e6), 1)


# ---- the bench ------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def row_of(ferry_run: FerryRun, base: BaselineResult | None, raw: RawTcp | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "strategy": ferry_run.strategy,
        "size_mib": ferry_run.size_mib,
        "status": ferry_run.status,
        "reason": ferry_run.reason,
        "client_pause_ms": ferry_run.pause_ms,
        "memory_ok": ferry_run.memory_ok,
        "criu_frozen_ms": ferry_run.criu_frozen_ms,
        "freeze_ms": ferry_run.freeze_ms,
        "total_s": ferry_run.total_s,
        "bytes_moved": ferry_run.bytes_moved,
        "bytes_moved_mib": round(ferry_run.bytes_moved / 2**20, 1),
        "transfer_s": ferry_run.transfer_s,
        "rate_mib_s": ferry_run.rate_mib_s,
        "baseline_recipe": base.recipe if base else None,
        "baseline_ok": base.ok if base else None,
        "baseline_pause_ms": base.pause_ms if base else None,
        "ratio_to_baseline": ratio(ferry_run.pause_ms, base.pause_ms if base else None),
        "raw_tcp_mib_s": raw.mib_s if raw else None,
        "rate_to_raw": ratio(ferry_run.rate_mib_s, raw.mib_s if raw else None),
        "stream_mib_s": ferry_run.stream_mib_s,
        "stream_to_raw": ratio(ferry_run.stream_mib_s, raw.mib_s if raw else None),
        "baseline_rate_to_raw": ratio(
            base.rate_mib_s if base else None, raw.mib_s if raw else None
        ),
        "ferry": asdict(ferry_run),
        "baseline": base.to_dict() if base else None,
        "raw_tcp": asdict(raw) if raw else None,
    }
    return row


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'strategy':<14}{'MiB':>6}{'pause ms':>10}{'frozen ms':>11}{'total s':>9}"
        f"{'moved MiB':>11}{'MiB/s':>8}{'base pause':>12}{'ratio':>7}{'raw MiB/s':>11}"
        f"{'rate/raw':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "unavailable":
            lines.append(
                f"{r['strategy']:<14}{r['size_mib']:>6}  unavailable: {str(r['reason'])[:90]}"
            )
            if r["baseline_pause_ms"] is not None:
                lines.append(f"{'':<20}(baseline {r['baseline_recipe']}: pause"
                             f" {r['baseline_pause_ms']:.0f} ms)")  # fmt: skip
            continue
        lines.append(
            f"{r['strategy']:<14}{r['size_mib']:>6}{_fmt(r['client_pause_ms'], '.0f'):>10}"
            f"{_fmt(r['criu_frozen_ms'], '.0f'):>11}{_fmt(r['total_s'], '.2f'):>9}"
            f"{r['bytes_moved_mib']:>11.1f}{_fmt(r['rate_mib_s'], '.1f'):>8}"
            f"{_fmt(r['baseline_pause_ms'], '.0f'):>12}{_fmt(r['ratio_to_baseline'], '.2f'):>7}"
            f"{_fmt(r['raw_tcp_mib_s'], '.0f'):>11}{_fmt(r['rate_to_raw'], '.2f'):>10}"
            + ("" if r["status"] == "completed" else f"  {r['status']}: {r['reason']}")
            + ("  MEMORY CHECK FAILED" if r["memory_ok"] is False else "")
        )
    return "\n".join(lines)


def baseline_table(results: list[BaselineResult], raws: dict[tuple[str, int], RawTcp]) -> str:
    head = (
        f"{'baseline':<14}{'MiB':>6}{'pause ms':>10}{'frozen ms':>11}{'total s':>9}"
        f"{'moved MiB':>11}{'MiB/s':>8}{'raw MiB/s':>11}{'rate/raw':>10}"
    )
    lines = [head, "-" * len(head)]
    for b in results:
        raw = raws.get((b.recipe, b.size_mib))
        if not b.ok:
            lines.append(f"{b.recipe:<14}{b.size_mib:>6}  FAILED: {b.error}")
            continue
        lines.append(
            f"{b.recipe:<14}{b.size_mib:>6}{_fmt(b.pause_ms, '.0f'):>10}"
            f"{_fmt(b.criu_frozen_ms, '.0f'):>11}{_fmt(b.total_s, '.2f'):>9}"
            f"{b.bytes_moved / 2**20:>11.1f}{_fmt(b.rate_mib_s, '.1f'):>8}"
            f"{_fmt(raw.mib_s if raw else None, '.0f'):>11}"
            f"{_fmt(ratio(b.rate_mib_s, raw.mib_s if raw else None), '.2f'):>10}"
        )
    return "\n".join(lines)


def parse_list(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="MiB, e.g. 64,512")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--lab", default=os.environ.get("FERRY_LAB", "bench"))
    parser.add_argument("--dirty-rate", type=float, default=8.0, help="MiB/s the app dirties")
    parser.add_argument("--no-baseline", action="store_true", help="skip the hand-run recipes")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args(argv)
    try:
        lab = validate_lab_name(args.lab)
        sizes = [int(s) for s in parse_list(args.sizes)]
    except (InvalidInput, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    strategies = parse_list(args.strategies)
    if not sizes or min(sizes) < 1 or not strategies:
        print("bench: --sizes and --strategies must name at least one", file=sys.stderr)
        return 2
    if read_spec(LabLayout(lab)) is not None:
        print(
            f"bench: a lab named {lab!r} is already up; the bench makes and removes its own"
            f" (use --lab NAME, or `FERRY_LAB={lab} ferry lab down`)",
            file=sys.stderr,
        )
        return 2
    subprocess.run(["make", "-C", str(REPO), "-s", "workloads"], check=True)

    info = machine()
    started_at = dt.datetime.now(dt.UTC)
    if not args.no_warmup:
        say(f"warming up memory for {max(sizes)} MiB runs (machine facts F16)")
        info["warmup_s"] = round(warm_up(max(sizes)), 1)
    rows: list[dict[str, Any]] = []
    baselines: list[BaselineResult] = []
    baseline_raws: dict[tuple[str, int], RawTcp] = {}
    tmp = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    try:
        rootfs = build_rootfs(tmp / "rootfs")
        shutil.copy2(DIRTYAPP, rootfs / "bin" / "dirtyapp")
        say(f"lab {lab}: 2 hosts")
        up = ferry(lab, "lab", "up", "--hosts", "2", timeout=300)
        if up.returncode != 0:
            raise BaselineError(f"ferry lab up: {_last_words(up)}")
        hosts = Hosts.load(lab)
        bench = FerryBench(lab, rootfs, args.dirty_rate)
        for size in sizes:
            for strategy in strategies:
                say(f"== {strategy}, {size} MiB: ferry migrate {SOURCE} -> {DESTINATION}")
                try:
                    moved = bench.migrate(size, strategy)
                except (
                    BaselineError,
                    ClientError,
                    OSError,
                    subprocess.SubprocessError,
                    ValueError,
                ) as exc:
                    moved = FerryRun(strategy, size, "error", f"{type(exc).__name__}: {exc}")
                say(
                    f"   {moved.status}: pause {_fmt(moved.pause_ms, '.0f')} ms,"
                    f" {moved.bytes_moved / 2**20:.1f} MiB"
                    + (f" ({moved.reason})" if moved.reason else "")
                )
                base = None
                recipe = MATCHING.get(strategy)
                if recipe is not None and not args.no_baseline:
                    bench.discard_idle()
                    base = run_recipe(
                        hosts, recipe, rootfs, size, memory_limit(size), args.dirty_rate, say=say
                    )
                    baselines.append(base)
                    say(
                        f"   baseline {recipe}: "
                        + (f"pause {base.pause_ms:.0f} ms" if base.ok else f"FAILED {base.error}")
                    )
                nbytes = moved.bytes_moved or (base.bytes_moved if base else 0)
                raw = None
                if nbytes:
                    try:
                        raw = raw_tcp(hosts, nbytes)
                        say(f"   raw TCP {nbytes / 2**20:.1f} MiB: {raw.mib_s:.0f} MiB/s")
                    except (BaselineError, OSError, subprocess.SubprocessError) as exc:
                        say(f"   raw TCP failed: {exc}")
                if base is not None and raw is not None:
                    baseline_raws[(base.recipe, size)] = raw
                rows.append(row_of(moved, base, raw))
        bench.discard_idle()
    finally:
        say(f"lab {lab}: down")
        ferry(lab, "lab", "down", timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)

    print(table(rows))
    if baselines:
        print()
        print(baseline_table(baselines, baseline_raws))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "date": started_at.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": info,
            "config": {
                "sizes_mib": sizes,
                "strategies": strategies,
                "dirty_mib_s": args.dirty_rate,
                "client_interval_ms": 1,
                "lab": lab,
                "moving_steps": list(MOVING_STEPS),
            },
            "rows": rows,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        say(f"wrote {args.json}")
    failed_baseline = any(not b.ok for b in baselines)
    failed_ferry = any(
        r["status"] not in ("completed", "unavailable") or r["memory_ok"] is False for r in rows
    )
    return 1 if failed_baseline or failed_ferry else 0


if __name__ == "__main__":
    sys.exit(main())
