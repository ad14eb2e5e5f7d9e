"""The benchmark's clients: what a user of the moving dirtyapp container feels, three ways.

  udp   a datagram every millisecond, each naming a different page ("P <n>"); dirtyapp
        re-checks the whole page and answers "ok <n> <generation> <seq>" or "bad <n>"
  tcp   the same requests, one every millisecond, on one kept TCP connection
  push  one kept TCP connection on which dirtyapp writes "tick <seq>" every millisecond

The pause a migration causes is the longest time between two consecutive valid messages
(replies, or ticks); a "bad" reply is a failed memory check. A TCP client whose connection
is reset or closed (ECONNRESET, EOF) says so in `resets`, connects again and counts it in
`reconnects`: for a live migration any reconnect is a failure.

    python -m deploy.bench.client IP PORT SECONDS [--mode udp|tcp|push]  # one JSON report

SIGINT or SIGTERM ends it early (with the report). As a library: `ping()` in a thread, or
`PingerProcess` — a subprocess, so the pacing does not compete with the caller for the GIL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal, get_args

Mode = Literal["udp", "tcp", "push"]
MODES: tuple[Mode, ...] = get_args(Mode)
INTERVAL_S = 0.001
DRAIN_S = 0.3  # after the last request, late replies still count
MAX_BEHIND_S = 0.05  # a client that fell further behind its pace skips, never bursts
CONNECT_TIMEOUT_S = 5.0
RECONNECT_EVERY_S = 0.05
MAX_PENDING = 1 << 20  # request bytes a TCP client queues while its peer is away


class ClientError(RuntimeError):
    """The client process failed or gave no report; the measurement is void."""


@dataclass
class Gaps:
    """The longest time between two consecutive good messages, fed their arrival times."""

    longest: float = 0.0
    start: float = 0.0  # arrival of the message before the longest gap
    end: float = 0.0  # … and of the one after it
    after: int = -1  # the number the message before it carried
    over_10ms: int = 0
    first: float | None = None
    last: float | None = None
    last_n: int = -1
    count: int = 0

    def seen(self, now: float, n: int) -> None:
        self.count += 1
        if self.last is None:
            self.first = now
        else:
            gap = now - self.last
            if gap > 0.010:
                self.over_10ms += 1
            if gap > self.longest:
                self.longest, self.start, self.end, self.after = gap, self.last, now, self.last_n
        self.last, self.last_n = now, n


@dataclass(frozen=True)
class PingReport:
    """What the client saw."""

    ip: str
    port: int
    seconds: float
    sent: int  # requests (push: 0)
    replies: int  # valid ("ok") replies, or ticks received
    bad: int  # replies whose page failed its check; push: ticks out of order
    lost: int  # requests with no reply at all; push: ticks the app skipped
    longest_gap_ms: float
    gap_start: float  # epoch seconds of the valid reply before the longest gap
    gap_end: float  # … and of the one after it
    gap_after_request: int  # the request (push: tick) answered just before the gap
    gaps_over_10ms: int
    started_at: float  # epoch seconds
    first_reply_at: float | None
    last_reply_at: float | None
    mode: str = "udp"
    reconnects: int = 0  # TCP: connections made again after a reset or EOF
    resets: list[str] = field(default_factory=list)  # TCP: what ended each connection, when

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PingReport:
        return cls(**json.loads(text))


def _report(
    mode: Mode,
    ip: str,
    port: int,
    gaps: Gaps,
    epoch: float,
    start: float,
    *,
    sent: int,
    bad: int,
    lost: int,
    reconnects: int = 0,
    resets: list[str] | None = None,
) -> PingReport:
    def wall(t: float | None) -> float | None:
        return round(epoch + t, 6) if t is not None else None

    return PingReport(
        ip=ip,
        port=port,
        seconds=round(time.monotonic() - start, 3),
        sent=sent,
        replies=gaps.count,
        bad=bad,
        lost=lost,
        longest_gap_ms=round(gaps.longest * 1000, 2),
        gap_start=round(epoch + gaps.start, 6) if gaps.longest else 0.0,
        gap_end=round(epoch + gaps.end, 6) if gaps.longest else 0.0,
        gap_after_request=gaps.after,
        gaps_over_10ms=gaps.over_10ms,
        started_at=round(epoch + start, 6),
        first_reply_at=wall(gaps.first),
        last_reply_at=wall(gaps.last),
        mode=mode,
        reconnects=reconnects,
        resets=list(resets or []),
    )


def ping(
    ip: str,
    port: int,
    seconds: float,
    stop: threading.Event | None = None,
    interval: float = INTERVAL_S,
) -> PingReport:
    """Send a datagram every `interval` (absolute pacing) until `seconds` pass or `stop`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    epoch = time.time() - time.monotonic()
    start = time.monotonic()
    end = start + seconds
    next_send = start
    sent = bad = 0
    answered: set[int] = set()
    gaps = Gaps()

    def take(now: float) -> None:
        nonlocal bad
        while True:
            try:
                data = sock.recv(512)
            except BlockingIOError:
                return
            except OSError:  # e.g. ICMP port unreachable while the app is away
                continue
            words = data.split()
            if len(words) < 2 or not words[1].isdigit():
                continue
            n = int(words[1])
            if words[0] == b"bad":
                bad += 1
                answered.add(n)
                continue
            if words[0] != b"ok" or n in answered:
                continue
            answered.add(n)
            gaps.seen(now, n)

    with sock:
        while True:
            now = time.monotonic()
            if now >= end or (stop is not None and stop.is_set()):
                break
            if now >= next_send:
                with contextlib.suppress(OSError):
                    sock.sendto(b"P %d\n" % sent, (ip, port))
                sent += 1
                next_send += interval
                if next_send < now - MAX_BEHIND_S:
                    next_send = now + interval
            wait = max(0.0, next_send - time.monotonic())
            ready, _, _ = select.select([sock], [], [], wait)
            if ready:
                take(time.monotonic())
        drain_until = time.monotonic() + DRAIN_S
        while (left := drain_until - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if ready:
                take(time.monotonic())
    return _report("udp", ip, port, gaps, epoch, start, sent=sent, bad=bad,
                   lost=sent - len(answered))  # fmt: skip


class Lines:
    """A kept TCP connection read line by line; `gone` says what ended it, if anything."""

    def __init__(self, ip: str, port: int, hello: bytes = b"") -> None:
        self.sock = socket.create_connection((ip, port), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.pending = hello
        self.gone: str | None = None

    def send(self, data: bytes) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending += data
        self.flush()

    def flush(self) -> None:
        while self.pending and self.gone is None:
            try:
                n = self.sock.send(self.pending)
            except BlockingIOError:
                return
            except OSError as exc:
                self.gone = _why(exc)
                return
            self.pending = self.pending[n:]

    def read(self) -> list[bytes]:
        """Whole lines that arrived (the connection may end while reading: see `gone`)."""
        while self.gone is None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                self.gone = _why(exc)
                break
            if not data:
                self.gone = "EOF"
                break
            self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines

    def close(self) -> None:
        self.sock.close()


def _why(exc: OSError) -> str:
    return type(exc).__name__ if exc.errno is None else f"{type(exc).__name__} ({exc.errno})"


def ping_tcp(
    ip: str,
    port: int,
    seconds: float,
    stop: threading.Event | None = None,
    interval: float = INTERVAL_S,
    push: bool = False,
) -> PingReport:
    """On one kept connection: a request every `interval`, or (`push`) dirtyapp's ticks.
    A reset or EOF is recorded, and the client connects again (counted) to go on measuring."""
    epoch = time.time() - time.monotonic()
    start = time.monotonic()
    end = start + seconds
    hello = b"PUSH\n" if push else b""
    conn: Lines | None = Lines(ip, port, hello)  # no connection at all: the run fails here
    next_send = next_connect = start
    sent = bad = lost = reconnects = 0
    resets: list[str] = []
    gaps = Gaps()
    last_tick = -1

    def take(now: float) -> None:
        nonlocal bad, lost, last_tick
        assert conn is not None
        for line in conn.read():
            words = line.split()
            if len(words) < 2 or not words[1].isdigit():
                continue
            n = int(words[1])
            if push:
                if words[0] != b"tick":
                    continue
                if n <= last_tick:
                    bad += 1  # out of order, or seen twice
                    continue
                lost += n - last_tick - 1 if last_tick >= 0 else 0
                last_tick = n
                gaps.seen(now, n)
            elif words[0] == b"bad":
                bad += 1
            elif words[0] == b"ok":
                gaps.seen(now, n)

    def lose(now: float) -> None:
        nonlocal conn, next_connect
        assert conn is not None
        resets.append(f"{conn.gone} at {epoch + now:.6f}")
        conn.close()
        conn, next_connect = None, now

    try:
        while True:
            now = time.monotonic()
            if now >= end or (stop is not None and stop.is_set()):
                break
            if conn is None and now >= next_connect:
                try:
                    conn = Lines(ip, port, hello)
                    reconnects += 1
                    last_tick = -1  # a new connection counts its ticks from 0
                except OSError:
                    next_connect = now + RECONNECT_EVERY_S
            if not push and now >= next_send:
                if conn is not None:
                    conn.send(b"P %d\n" % sent)
                sent += 1
                next_send += interval
                if next_send < now - MAX_BEHIND_S:
                    next_send = now + interval
            if conn is None:
                time.sleep(min(RECONNECT_EVERY_S, max(0.0, end - now)))
                continue
            wait = max(0.0, (next_send if not push else now + 0.05) - time.monotonic())
            writing = [conn.sock] if conn.pending else []
            readable, writable, _ = select.select([conn.sock], writing, [], wait)
            if writable:
                conn.flush()
            if readable:
                take(time.monotonic())
            if conn.gone is not None:
                lose(time.monotonic())
        drain_until = time.monotonic() + (0.0 if push else DRAIN_S)
        while conn is not None and conn.gone is None:
            left = drain_until - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select([conn.sock], [], [], left)
            if readable:
                take(time.monotonic())
        if conn is not None and conn.gone is not None:
            lose(time.monotonic())
    finally:
        if conn is not None:
            conn.close()
    if not push:
        lost = sent - gaps.count - bad
    return _report(
        "push" if push else "tcp", ip, port, gaps, epoch, start, sent=sent, bad=bad,
        lost=lost, reconnects=reconnects, resets=resets,
    )  # fmt: skip


class PingerProcess:
    """A client in its own process: `start()`, run the migration, then `stop()` -> report."""

    def __init__(self, ip: str, port: int, max_seconds: float = 900.0, mode: Mode = "udp") -> None:
        self.ip, self.port, self.max_seconds, self.mode = ip, port, max_seconds, mode
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> PingerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.bench.client", self.ip, str(self.port),
             str(self.max_seconds), "--mode", self.mode],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        return self

    def stop(self) -> PingReport:
        assert self.proc is not None, "start() first"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise ClientError(
                f"{self.mode} client exited {self.proc.returncode}: {err.strip()[-500:]}"
            )
        return PingReport.from_json(lines[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Clients:
    """Several clients on one container, started and stopped together (by mode)."""

    def __init__(self, ip: str, port: int, modes: tuple[Mode, ...] = MODES) -> None:
        self.procs = {mode: PingerProcess(ip, port, mode=mode) for mode in modes}

    def start(self) -> Clients:
        try:
            for proc in self.procs.values():
                proc.start()
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self) -> dict[str, PingReport]:
        """Every client's report; one that failed fails the measurement, after all stopped."""
        reports: dict[str, PingReport] = {}
        errors: list[str] = []
        for mode, proc in self.procs.items():
            try:
                reports[mode] = proc.stop()
            except ClientError as exc:
                errors.append(str(exc))
        if errors:
            raise ClientError("; ".join(errors))
        return reports

    def kill(self) -> None:
        for proc in self.procs.values():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--mode", choices=MODES, default="udp")
    parser.add_argument("--interval-ms", type=float, default=INTERVAL_S * 1000)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    interval = args.interval_ms / 1000
    if args.mode == "udp":
        report = ping(args.ip, args.port, args.seconds, stop, interval)
    else:
        report = ping_tcp(args.ip, args.port, args.seconds, stop, interval, args.mode == "push")
    print(report.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
