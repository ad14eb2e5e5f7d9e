"""Packets for a moving container held, not dropped, and let through in order at the commit.

The destination's container netns sends everything but loopback and CRIU's marked packets
to NFQUEUE queue 0 (services/runtime/netlock.py). This module's holder process, started in
that netns at prepare, keeps each packet's verdict back:

- **hold** (from the start): every packet waits in the kernel's queue, in arrival order;
- **release** (after the commit): the held ones are accepted in the order they came, then
  every later one at once — until the rules are gone and the holder is told to stop;
- **drop** (the move does not stay): the held ones and every later one are dropped.

A dropped packet costs a client one retransmission; a packet let through too early would
reach a socket not restored yet and get a reset, or a copy that must not run yet. So it
fails closed: with no holder bound (never started, died, killed with its migration), the
kernel drops what the rules queue — nothing ever passes unheld. A full queue drops too;
the kernel counts it, and `stats` reports the count.

    nsenter --net=NETNS python -m services.runtime.packet_hold --control SOCKET

The worker talks to it over the unix socket SOCKET, one command line per connection
(`stats`, `release`, `drop`, `stop`), one JSON answer back.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.errors import RuntimeFailure

QUEUE_NUM = 0
# Packets the kernel keeps waiting, per container: a loaded server's clients keep sending
# through a second-long freeze (each waiting skb holds about 2 KiB of kernel memory).
QUEUE_PACKETS = 65536
NETLINK_BUFFER_BYTES = 16 << 20  # metadata only (COPY_META): ~100 bytes per packet
READY_S = 10.0
COMMAND_TIMEOUT_S = 10.0
MAX_UNIX_PATH = 107
HOOK_NAMES = {1: "in", 3: "out"}  # NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT

Mode = Literal["hold", "release", "drop"]


@dataclass
class HoldStats:
    """What went through the hold, as the holder saw it and the kernel counted it."""

    mode: Mode = "hold"
    held_in: int = 0  # packets for the container, held
    held_out: int = 0  # packets from it (a restored socket's first sends), held
    waiting: int = 0  # held now
    peak: int = 0  # the most held at once
    released: int = 0  # let through after being held
    passed: int = 0  # let through at once, after the release
    dropped: int = 0  # dropped by the holder (the move did not stay)
    kernel_dropped: int = 0  # the queue was full
    undelivered: int = 0  # the kernel could not hand a packet to the holder
    first_held_at: float | None = None
    released_at: float | None = None
    hold_ms: float | None = field(default=None)  # first held packet -> release

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def kernel_counters(queue_num: int = QUEUE_NUM) -> tuple[int, int]:
    """(dropped because the queue was full, dropped because the holder's socket was) from
    this netns's /proc/net/netfilter/nfnetlink_queue; zeros when the queue is not there."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/netfilter/nfnetlink_queue").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 7 and fields[0] == str(queue_num):
                return int(fields[5]), int(fields[6])
    return 0, 0


class Holder:
    """The verdicts: kept back, then given in order. One process per held netns."""

    def __init__(self) -> None:
        self.stats = HoldStats()
        self.waiting: collections.deque[Any] = collections.deque()

    def on_packet(self, packet: Any) -> None:
        mode = self.stats.mode
        if mode == "release":
            packet.accept()
            self.stats.passed += 1
        elif mode == "drop":
            packet.drop()
            self.stats.dropped += 1
        else:
            self.waiting.append(packet)
            direction = HOOK_NAMES.get(packet.hook, "in")
            if direction == "out":
                self.stats.held_out += 1
            else:
                self.stats.held_in += 1
            if self.stats.first_held_at is None:
                self.stats.first_held_at = time.time()
            self.stats.peak = max(self.stats.peak, len(self.waiting))

    def release(self) -> None:
        """Everything held, in the order it came; what comes later passes at once."""
        now = time.time()
        while self.waiting:
            self.waiting.popleft().accept()
            self.stats.released += 1
        if self.stats.mode == "hold":
            self.stats.released_at = now
            if self.stats.first_held_at is not None:
                self.stats.hold_ms = round((now - self.stats.first_held_at) * 1000, 1)
        self.stats.mode = "release"

    def drop(self) -> None:
        while self.waiting:
            self.waiting.popleft().drop()
            self.stats.dropped += 1
        self.stats.mode = "drop"

    def report(self) -> HoldStats:
        self.stats.waiting = len(self.waiting)
        self.stats.kernel_dropped, self.stats.undelivered = kernel_counters()
        return self.stats


def serve(control: Path) -> None:
    """The holder process: bind the queue, answer commands until `stop` (or SIGTERM)."""
    from netfilterqueue import COPY_META, NetfilterQueue  # only in the holder process

    holder = Holder()
    queue = NetfilterQueue()
    queue.bind(
        QUEUE_NUM,
        holder.on_packet,
        max_len=QUEUE_PACKETS,
        mode=COPY_META,
        sock_len=NETLINK_BUFFER_BYTES,
    )
    control.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(control))
    os.chmod(control, 0o600)
    listener.listen(8)
    selector = selectors.DefaultSelector()
    selector.register(queue.get_fd(), selectors.EVENT_READ, "queue")
    selector.register(listener, selectors.EVENT_READ, "control")
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    while not stopping:
        for key, _ in selector.select(timeout=1.0):
            if key.data == "queue":
                queue.run(block=False)
                continue
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(2.0)
                try:
                    command = conn.recv(64).decode().strip()
                except (OSError, UnicodeDecodeError):
                    continue
                queue.run(block=False)  # what already arrived comes before the command
                if command == "release":
                    holder.release()
                elif command == "drop":
                    holder.drop()
                elif command == "stop":
                    stopping = True
                elif command != "stats":
                    conn.sendall(json.dumps({"error": f"unknown command {command!r}"}).encode())
                    continue
                with contextlib.suppress(OSError):
                    conn.sendall(holder.report().to_json().encode())
    # Unbinding drops whatever still waits: only `drop` or `release` should leave nothing.
    queue.unbind()
    listener.close()
    control.unlink(missing_ok=True)


# -- the worker's side ---------------------------------------------------------------------


def control_path(migration_root: Path) -> Path:
    path = migration_root / "hold.sock"
    if len(str(path)) > MAX_UNIX_PATH:
        raise RuntimeFailure(
            f"the packet holder's socket path is {len(str(path))} bytes ({path}); unix"
            f" sockets allow {MAX_UNIX_PATH}: choose a shorter state_dir"
        )
    return path


async def command(migration_root: Path, what: str) -> HoldStats | None:
    """Send the holder one command; its stats, or None when no holder answers there."""
    path = control_path(migration_root)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path)), COMMAND_TIMEOUT_S
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"{what}\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), COMMAND_TIMEOUT_S)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    try:
        fields = json.loads(answer)
        return HoldStats(**fields)
    except (ValueError, TypeError) as exc:
        raise RuntimeFailure(f"the packet holder answered {what!r} with {answer[:200]!r}") from exc


async def start(netns: Path, migration_root: Path) -> HoldStats:
    """Start the holder in `netns` unless one answers already (a redelivered prepare);
    returns once it holds. Its log is the migration's hold.log."""
    running = await command(migration_root, "stats")
    if running is not None:
        return running
    control = control_path(migration_root)
    log = (migration_root / "hold.log").open("ab")
    argv = [
        "nsenter", f"--net={netns}", sys.executable, "-m", "services.runtime.packet_hold",
        "--control", str(control),
    ]  # fmt: skip
    with log:
        # Its own session: it outlives a restarting worker, and the migration's directory
        # on its command line lets kill_working_on find it when the move is abandoned.
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), READY_S)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        tail = (migration_root / "hold.log").read_text(errors="replace")[-500:]
        raise RuntimeFailure(f"the packet holder did not start in {netns}: {tail.strip()}")
    stats = await command(migration_root, "stats")
    if stats is None:
        raise RuntimeFailure(f"the packet holder in {netns} does not answer on {control}")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", type=Path, required=True)
    serve(parser.parse_args().control)


if __name__ == "__main__":
    main()
