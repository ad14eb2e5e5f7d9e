"""The benchmark's client: asks dirtyapp about one page every millisecond, over UDP.

Each request names a different page ("P <n>"); dirtyapp re-checks the whole page and answers
"ok <n> <generation> <seq>" or "bad <n>". The pause a migration causes is the longest time
between two consecutive valid replies; a "bad" reply is a failed memory check.

    python -m deploy.bench.client IP PORT SECONDS     # prints one JSON report

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
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

INTERVAL_S = 0.001
DRAIN_S = 0.3  # after the last request, late replies still count
MAX_BEHIND_S = 0.05  # a client that fell further behind its pace skips, never bursts


class ClientError(RuntimeError):
    """The client process failed or gave no report; the measurement is void."""


@dataclass(frozen=True)
class PingReport:
    """What the client saw."""

    ip: str
    port: int
    seconds: float
    sent: int
    replies: int  # valid ("ok") replies
    bad: int  # replies whose page failed its check
    lost: int  # requests with no reply at all
    longest_gap_ms: float
    gap_start: float  # epoch seconds of the valid reply before the longest gap
    gap_end: float  # … and of the one after it
    gap_after_request: int  # the request answered just before the gap
    gaps_over_10ms: int
    started_at: float  # epoch seconds
    first_reply_at: float | None
    last_reply_at: float | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PingReport:
        return cls(**json.loads(text))


def ping(
    ip: str,
    port: int,
    seconds: float,
    stop: threading.Event | None = None,
    interval: float = INTERVAL_S,
) -> PingReport:
    """Send a request every `interval` (absolute pacing) until `seconds` pass or `stop` is set."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    epoch = time.time() - time.monotonic()
    start = time.monotonic()
    end = start + seconds
    next_send = start
    sent = replies = bad = gaps_over_10ms = 0
    answered: set[int] = set()
    last_ok: float | None = None
    first_ok: float | None = None
    longest = 0.0
    gap_from = gap_to = 0.0
    gap_after = -1
    last_n = -1

    def take(now: float) -> None:
        nonlocal replies, bad, last_ok, first_ok, longest, gap_from, gap_to, gap_after
        nonlocal gaps_over_10ms, last_n
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
            replies += 1
            if last_ok is not None:
                gap = now - last_ok
                if gap > 0.010:
                    gaps_over_10ms += 1
                if gap > longest:
                    longest, gap_from, gap_to, gap_after = gap, last_ok, now, last_n
            else:
                first_ok = now
            last_ok, last_n = now, n

    with sock:
        while True:
            now = time.monotonic()
            stopping = now >= end or (stop is not None and stop.is_set())
            if stopping:
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
    return PingReport(
        ip=ip,
        port=port,
        seconds=round(time.monotonic() - start, 3),
        sent=sent,
        replies=replies,
        bad=bad,
        lost=sent - len(answered),
        longest_gap_ms=round(longest * 1000, 2),
        gap_start=round(epoch + gap_from, 6) if longest else 0.0,
        gap_end=round(epoch + gap_to, 6) if longest else 0.0,
        gap_after_request=gap_after,
        gaps_over_10ms=gaps_over_10ms,
        started_at=round(epoch + start, 6),
        first_reply_at=round(epoch + first_ok, 6) if first_ok is not None else None,
        last_reply_at=round(epoch + last_ok, 6) if last_ok is not None else None,
    )


class PingerProcess:
    """The client in its own process: `start()`, run the migration, then `stop()` -> report."""

    def __init__(self, ip: str, port: int, max_seconds: float = 900.0) -> None:
        self.ip, self.port, self.max_seconds = ip, port, max_seconds
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> PingerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.bench.client", self.ip, str(self.port),
             str(self.max_seconds)],
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
            raise ClientError(f"client exited {self.proc.returncode}: {err.strip()[-500:]}")
        return PingReport.from_json(lines[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("--interval-ms", type=float, default=INTERVAL_S * 1000)
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    report = ping(args.ip, args.port, args.seconds, stop, args.interval_ms / 1000)
    print(report.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
