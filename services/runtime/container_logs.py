"""A container's stdout and stderr: one pipe, read on the host by daemontools' `multilog`,
which writes `<container dir>/log/` — `current` and at most `files - 1` rotated files of
at most `file_bytes` each, every line stamped (TAI64N).

CRIU dumps a pipe whose reader is outside the container (runc records it in the images'
descriptors.json); `runc restore` hands the restored process the pipe it is given itself
(CRIU's inherit-fd), so a restored container writes to a new logger on its new host. The
log directory moves with the container inside the freeze, after the old logger has read
everything (it ends when the dumped container is gone, at the pipe's end of file), and the
new logger appends to the same `current`: one log, before and after a move.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure
from services.runtime.proc import host_env

LOG_DIR = "log"
CURRENT = "current"
LOCK = "lock"
LOGGER = "multilog"
LOCK_WAIT_S = 5.0  # an old logger of the same dir reads its pipe's end and exits
DRAIN_WAIT_S = 1.0  # inside the freeze: the old logger writes what it still read
POLL_S = 0.02
TAI64N_LEN = 25  # "@" and 24 hex digits
TAI64_EPOCH = 2**62 + 10  # TAI64 label of 1970-01-01 00:00:00 TAI, as multilog writes UTC

_children: set[asyncio.Task[int]] = set()  # reaped when they end, never waited on


def _locked(log_dir: Path) -> bool:
    """Whether a logger holds the directory (multilog flocks `lock` while it runs)."""
    try:
        fd = os.open(log_dir / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


async def wait_unlocked(log_dir: Path, timeout: float) -> bool:
    """Until no logger holds the directory; False if one still does after `timeout`."""
    deadline = time.monotonic() + timeout
    while _locked(log_dir):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


@dataclass(frozen=True)
class Logger:
    fd: int  # the pipe's write end: give it to runc as stdout and stderr, then close it
    process: asyncio.subprocess.Process


async def start_logger(log_dir: Path, file_bytes: int, files: int) -> Logger:
    """A logger for a container about to start or be restored. It runs in a session of
    its own: it outlives the worker, and ends at the pipe's end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if not await wait_unlocked(log_dir, LOCK_WAIT_S):
        raise RuntimeFailure(f"another logger still holds {log_dir}", retryable=True)
    read_end, write_end = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            LOGGER, "t", f"s{file_bytes}", f"n{files}", str(log_dir),
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=host_env(), start_new_session=True, cwd="/",
        )  # fmt: skip
    except FileNotFoundError as exc:
        os.close(write_end)
        raise RuntimeFailure(f"{LOGGER} is not installed (run `make setup`)") from exc
    finally:
        os.close(read_end)
    task = asyncio.create_task(proc.wait())
    _children.add(task)
    task.add_done_callback(_children.discard)
    return Logger(write_end, proc)


async def drained(log_dir: Path) -> None:
    """After the freeze, before the directory is sent: the old logger has written what it
    read (it exits once the dumped container is gone; a post-copy source stays stopped,
    and then its log stops growing). Bounded: a log is never worth a longer freeze."""
    deadline = time.monotonic() + DRAIN_WAIT_S
    size = -1
    while _locked(log_dir) and time.monotonic() < deadline:
        now = _size(log_dir)
        if now == size:
            return
        size = now
        await asyncio.sleep(POLL_S)


def _size(log_dir: Path) -> int:
    with contextlib.suppress(OSError):
        return sum(p.stat().st_size for p in log_dir.iterdir() if p.is_file())
    return 0


# ---- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    at: float | None  # UTC seconds, from the stamp; None when a line has none
    text: str


@dataclass(frozen=True)
class Cursor:
    """Where a reader stopped: the rotated files it had seen whole, and how far into
    `current` it read. Rotation renames `current`, so a file it did not know yet continues
    from `offset`. The log moves whole with its container, so a cursor holds across a move."""

    rotated: tuple[str, ...]
    offset: int

    def encode(self) -> str:
        return ",".join((str(self.offset), *self.rotated))

    @classmethod
    def decode(cls, text: str) -> Cursor:
        offset, *rotated = text.split(",")
        try:
            return cls(tuple(rotated), int(offset))
        except ValueError:
            raise InvalidInput(f"bad log cursor {text!r}", field="cursor") from None


def _rotated(log_dir: Path) -> list[str]:
    if not log_dir.is_dir():
        return []
    return sorted(p.name for p in log_dir.iterdir() if p.name.startswith("@") and p.is_file())


def _parse(line: bytes) -> LogLine:
    text = line.decode(errors="replace")
    stamp, _, rest = text.partition(" ")
    if len(stamp) == TAI64N_LEN and stamp.startswith("@"):
        try:
            seconds = int(stamp[1:17], 16) - TAI64_EPOCH
            nanos = int(stamp[17:25], 16)
            return LogLine(at=seconds + nanos / 1e9, text=rest)
        except ValueError:
            pass
    return LogLine(at=None, text=text)


def read(
    log_dir: Path, *, tail: int | None = None, after: Cursor | None = None
) -> tuple[list[LogLine], Cursor]:
    """The log's lines, oldest first: all, the last `tail`, or those after `after`; and
    the cursor to continue from. A half-written last line waits for its end."""
    rotated = _rotated(log_dir)
    current = log_dir / CURRENT
    chunks: list[bytes] = []
    start = after.offset if after else 0
    if after is not None:
        new = [name for name in rotated if name not in after.rotated]
        for i, name in enumerate(new):
            data = (log_dir / name).read_bytes()
            chunks.append(data[start if i == 0 else 0 :])
        start = 0 if new else start
    else:
        chunks += [(log_dir / name).read_bytes() for name in rotated]
    try:
        data = current.read_bytes()
    except FileNotFoundError:
        data = b""
    complete = data[: data.rfind(b"\n") + 1] if b"\n" in data else b""
    chunks.append(complete[start:] if start <= len(complete) else b"")
    lines = [_parse(line) for chunk in chunks for line in chunk.splitlines()]
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    return lines, Cursor(tuple(rotated), len(complete))
