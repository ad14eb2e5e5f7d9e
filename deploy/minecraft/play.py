"""`make demo-minecraft`: a live Minecraft server moves between "clouds" while its players play.

    make demo-minecraft            # = python -m deploy.minecraft.play --bots 4
    python -m deploy.minecraft.play [--bots 3] [--strategy stop-and-copy --strategy post-copy]

Brings up a lab of two hosts on two routed network segments (FERRY_LAB, default `mcdemo`),
builds the server's image (a node runtime layer, the flying-squid app layer on top) and pulls it
onto both hosts ahead of time, runs the server on h1, connects mineflayer bots from the root
network namespace, then for each strategy moves the server h1 -> h2 -> h1. Before each move
every bot places blocks; after it, every bot and a fresh observer check all blocks placed so
far. At the end, per bot: stayed connected (one login, no disconnect), the longest pause
between the server's time updates (sent at 1 Hz, so ~1000 ms is no pause at all), chats sent
and received, and whether its blocks were all there after each move. Exit 0 when every move
completed and every bot rode through all of them with every block in place.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from deploy.minecraft.rootfs import BUILD, ENTRY, PORT, build_layers

FERRY = str(Path(sys.executable).parent / "ferry")
NAME = "minecraft"
IMAGE = "flying-squid"
RUNTIME_IMAGE = "node-runtime"
STRATEGIES = ("stop-and-copy", "post-copy")
SETTLE_S = 3.0  # after a move: a few time updates must arrive before the gap window is read
CPU_SAMPLE_S = 10.0
JOIN_TIMEOUT_S = 120.0
COMMAND_TIMEOUT_S = 60.0
CHECK_TIMEOUT_S = 180.0  # a fresh observer joins and loads chunks


class BotsFailed(RuntimeError):
    """bots.js exited, or did not answer a command in time."""


def ferry(lab: str, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FERRY, *args], env={**os.environ, "FERRY_LAB": lab}, text=True, check=False,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )  # fmt: skip


def wait_for_port(ip: str, port: int, timeout: float) -> None:
    """The container runs before node listens: loading the world takes a few seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Bots:
    """bots.js as a child process: commands on its stdin, JSON events from its stdout."""

    def __init__(self, ip: str, count: int, log: TextIO, build: Path = BUILD) -> None:
        self.incidents: list[dict[str, Any]] = []  # disconnects and errors, as they come
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._proc = subprocess.Popen(
            ["node", str(build / "bots.js"), "--host", ip, "--port", str(PORT),
             "--bots", str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            event = json.loads(line)
            if event["event"] in ("disconnect", "error"):
                self.incidents.append(event)
                print(f"   ! {event}", flush=True)
            self._events.put(event)
        self._events.put(None)  # the process ended

    def wait_for(self, kind: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BotsFailed(f"no {kind!r} from bots.js within {timeout:.0f} s") from None
            if event is None:
                raise BotsFailed(f"bots.js exited (rc {self._proc.wait()}) before {kind!r}")
            if event["event"] == kind:
                return event

    def command(self, line: str, answer: str, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self.wait_for(answer, timeout)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


@dataclass
class Move:
    """One migration as the players saw it."""

    strategy: str
    source: str
    destination: str
    state: str = "not run"
    migration_id: str | None = None
    freeze_ms: float | None = None
    time_gap_ms: dict[str, int] = field(default_factory=dict)  # per bot, over this move
    packet_gap_ms: dict[str, int] = field(default_factory=dict)
    blocks_ok: bool = False
    blocks_ok_by_bot: dict[str, bool] = field(default_factory=dict)
    error: str | None = None

    def line(self) -> str:
        gaps = "/".join(str(v) for v in self.time_gap_ms.values())
        packets = "/".join(str(v) for v in self.packet_gap_ms.values())
        return (
            f"{self.strategy:>13} {self.source}->{self.destination}: {self.state:<11}"
            f" freeze {self.freeze_ms} ms, tick gap per bot {gaps} ms"
            f" (any packet {packets} ms), blocks kept {self.blocks_ok}"
            + (f"  [{self.error}]" if self.error else "")
        )


@dataclass(frozen=True)
class Usage:
    """The container's memory and CPU time, from its cgroup (v1, the lab's layout)."""

    rss_mib: float
    cpu_s: float

    @classmethod
    def sample(cls, lab: str, host: str) -> Usage | None:
        rel = Path(f"ferry-{lab}") / host / NAME
        try:
            memory = Path("/sys/fs/cgroup/memory") / rel / "memory.stat"
            stat = dict(line.split() for line in memory.read_text().splitlines())
            cpu = Path("/sys/fs/cgroup/cpuacct") / rel / "cpuacct.usage"
            return cls(int(stat["total_rss"]) / 2**20, int(cpu.read_text()) / 1e9)
        except (OSError, KeyError, ValueError):
            return None  # another layout: say nothing rather than guess


def cpu_percent(lab: str, host: str, seconds: float) -> float | None:
    before = Usage.sample(lab, host)
    time.sleep(seconds)
    after = Usage.sample(lab, host)
    if before is None or after is None:
        return None
    return 100 * (after.cpu_s - before.cpu_s) / seconds


def migrate(lab: str, move: Move, bots: Bots, places: int) -> None:
    """Place blocks, move the server, then read the pause and check every block so far."""
    placed = bots.command(f"place {places}", "placed")
    failures = [b for b in placed["bots"] if b.get("error")]
    if failures:
        move.error = f"placing failed: {failures}"
    bots.command("stats", "stats")  # opens a fresh gap window for this move
    run = ferry(lab, "migrate", NAME, "--to", move.destination, "--strategy", move.strategy,
                "--json")  # fmt: skip
    try:
        record = json.loads(run.stdout)
    except json.JSONDecodeError:
        record = {}
    move.state = str(record.get("state", f"exit {run.returncode}"))
    move.migration_id = record.get("id")
    move.freeze_ms = record.get("freeze_ms")
    if run.returncode != 0:
        move.error = " ".join([move.error or "", *run.stderr.strip().splitlines()[-1:]]).strip()
    time.sleep(SETTLE_S)
    stats = bots.command("stats", "stats")
    move.time_gap_ms = {b["bot"]: b["time_gap_window_ms"] for b in stats["bots"]}
    move.packet_gap_ms = {b["bot"]: b["packet_gap_window_ms"] for b in stats["bots"]}
    check = bots.command("check", "check", timeout=CHECK_TIMEOUT_S)
    move.blocks_ok = bool(check["ok"])
    server_view = check.get("server_view", {}).get("bots", {})
    for name, own in check.get("own_view", {}).items():
        # Kept: the bot still sees every block it placed, and so does a fresh observer.
        move.blocks_ok_by_bot[name] = not own.get("missing", ["?"]) and not server_view.get(
            name, {}
        ).get("missing", ["?"])
    if not check["ok"]:
        move.error = f"{move.error or ''} check: {json.dumps(check)[:400]}".strip()


def play(lab: str, ip: str, args: argparse.Namespace, log: TextIO) -> dict[str, Any]:
    """Bots join, the server moves per strategy h1 -> h2 -> h1; the full report."""
    strategies: list[str] = args.strategy or list(STRATEGIES)
    moves: list[Move] = []
    bots = Bots(ip, args.bots, log)
    try:
        ready = bots.wait_for("ready", timeout=JOIN_TIMEOUT_S)
        print(f"== {len(ready['bots'])} bots play at {ip}:{PORT}", flush=True)
        cpu = cpu_percent(lab, "h1", CPU_SAMPLE_S)
        before = Usage.sample(lab, "h1")
        print(f"   server while they play: {before}, cpu {cpu} %", flush=True)
        host = "h1"
        for strategy in strategies:
            for destination in ("h2", "h1"):
                move = Move(strategy, host, destination)
                print(f"\n== {strategy}: {host} -> {destination}", flush=True)
                migrate(lab, move, bots, args.places)
                print(move.line(), flush=True)
                moves.append(move)
                if move.state == "completed":
                    host = destination
        after = Usage.sample(lab, host)
        report = bots.command("quit", "report")
    finally:
        bots.close()
    return {
        "moves": [asdict(m) for m in moves],
        "bots": report["bots"],
        "incidents": bots.incidents,
        "server": {
            "before_moves": asdict(before) if before else None,
            "cpu_percent_while_playing": cpu,
            "after_moves": asdict(after) if after else None,  # cpu_s restarts with each restore
        },
    }


def table(result: dict[str, Any]) -> str:
    """The end-of-run table: one row per bot."""
    moves = [Move(**m) for m in result["moves"]]
    head = (
        f"{'bot':<8} {'stayed connected':<17} {'logins':>6} {'longest tick gap':>17}"
        f" {'chats sent':>10} {'received':>9}  blocks kept after each move"
    )
    rows = [head, "-" * len(head)]
    for b in result["bots"]:
        kept = " ".join("yes" if m.blocks_ok_by_bot.get(b["bot"]) else "NO" for m in moves)
        rows.append(
            f"{b['bot']:<8} {'yes' if b['stayed_connected'] else 'NO':<17} {b['logins']:>6}"
            f" {b['time_gap_max_ms']:>14} ms {b['chat_sent']:>10}"
            f" {sum(b['chat_received'].values()):>9}  {kept}"
        )
    rows.append("")
    rows += [m.line() for m in moves]
    rows.append(
        "(the server sends its time once a second: a tick gap of ~1000 ms is no pause at all)"
    )
    return "\n".join(rows)


def summary(result: dict[str, Any]) -> bool:
    print("\n== end of run")
    print(table(result))
    print(f"server: {result['server']}")
    return (
        bool(result["moves"])
        and all(m["state"] == "completed" and m["blocks_ok"] for m in result["moves"])
        and all(b["stayed_connected"] for b in result["bots"])
    )


def install_image(lab: str, tmp: Path) -> bool:
    """The server's image: a node runtime layer and the app layer on top, pulled onto
    every host ahead of time, as from a registry. A move then carries only the container's
    own writes and its memory."""
    layers = build_layers(tmp / "layers")
    steps = [
        ("image", "build", str(layers.runtime), "--name", RUNTIME_IMAGE),
        ("image", "build", str(layers.app), "--name", IMAGE, "--base", RUNTIME_IMAGE),
        ("image", "pull", IMAGE),
    ]
    for step in steps:
        print(f"== ferry {' '.join(step[:2])} {step[-1] if step[1] == 'pull' else step[4]}")
        done = ferry(lab, *step)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bots", type=int, default=3)
    parser.add_argument("--strategy", action="append", choices=STRATEGIES)
    parser.add_argument("--places", type=int, default=2, help="blocks per bot before each move")
    parser.add_argument("--memory", type=int, default=1024, help="container memory limit, MiB")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    parser.add_argument(
        "--segments", type=int, default=2, help='network segments ("clouds") the hosts sit on'
    )
    args = parser.parse_args()
    lab = os.environ.get("FERRY_LAB", "mcdemo")

    print(f"== lab {lab}: two hosts on {args.segments} network segments", flush=True)
    up = ["lab", "up", "--hosts", "2", "--segments", str(args.segments)]
    if ferry(lab, *up, capture=False).returncode != 0:
        return 1
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-minecraft-") as tmp:
            if not install_image(lab, Path(tmp)):
                return 1
            print(f"== {NAME}: flying-squid on h1, from image {IMAGE}", flush=True)
            run = ferry(
                lab, "container", "run", "--host", "h1", "--name", NAME, "--image", IMAGE,
                "--memory", str(args.memory), "--", *ENTRY,
            )  # fmt: skip
            if run.returncode != 0:
                print(run.stderr, file=sys.stderr)
                return 1
            ip = run.stdout.strip().splitlines()[-1]
            log_path = Path(tmp) / "bots.log"
            try:
                wait_for_port(ip, PORT, timeout=60)
                with log_path.open("w") as log:
                    result = play(lab, ip, args, log)
            finally:
                if log_path.exists():
                    sys.stderr.write(log_path.read_text()[-2000:])
                ferry(lab, "container", "rm", NAME)
    finally:
        if not args.keep:
            ferry(lab, "lab", "down", capture=False)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if summary(result) else 1


if __name__ == "__main__":
    sys.exit(main())
