"""Running host commands with errors that keep the command's own words."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.errors import RuntimeFailure

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Completed:
    """A finished command: its exit code and decoded output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _failure(
    argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
) -> RuntimeFailure:
    words = (stderr.strip() or stdout.strip()).splitlines()
    said = words[-1] if words else "no output"
    status = "timed out" if returncode is None else f"exited {returncode}"
    return RuntimeFailure(f"{argv[0]} {status}: {said}", log_tail="\n".join(words[-20:]))


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    input_text: str | None = None,
) -> Completed:
    """Run a command to completion; raise RuntimeFailure with its stderr when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise _failure(argv, None, str(exc.stdout or ""), str(exc.stderr or "")) from exc
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"{argv[0]} is not installed (run `make setup`)") from exc
    if check and done.returncode != 0:
        raise _failure(argv, done.returncode, done.stdout, done.stderr)
    return Completed(tuple(argv), done.returncode, done.stdout, done.stderr)


async def arun(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Completed:
    """Async `run`: the worker's event loop keeps serving while the command runs."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=None if env is None else {**os.environ, **env},
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"{argv[0]} is not installed (run `make setup`)") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        proc.kill()
        await proc.wait()
        raise _failure(argv, None, "", "") from exc
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise _failure(argv, proc.returncode, stdout, stderr)
    return Completed(tuple(argv), proc.returncode, stdout, stderr)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (via /proc's children lists)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
    return found


def process_state(pid: int) -> str:
    """The one-letter state from /proc/PID/stat ("T" = stopped), or "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def resident_memory(pid: int) -> int:
    """Resident memory of the process tree rooted at `pid` (a container), in bytes."""
    total = 0
    for current in tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def kill_working_on(migration_dir: Path) -> int:
    """SIGKILL whatever still works on one migration here (a page server, runc, CRIU): a
    step that was abandoned must not finish behind its compensation's back. Such a
    process names the migration's directory on its command line."""
    marker = str(migration_dir).encode()
    # Only this host's processes: simulated hosts share /proc but not their mount namespace.
    own_mounts = os.stat("/proc/self/ns/mnt").st_ino
    killed = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            if marker not in cmdline or os.stat(f"{entry.path}/ns/mnt").st_ino != own_mounts:
                continue
        except OSError:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
    return killed
