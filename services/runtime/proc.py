"""Running host commands with errors that keep the command's own words.

Every command a step runs starts in a session of its own; a step that is cancelled (its
deadline, a lost lease) kills that process group — runc and the CRIU it drives — and
nothing else: a container is always its own session (runc's init calls setsid), so it is
never in the group. Commands get the host's environment without what only Ferry's own
workers may run under (libfaketime in tests): runc, CRIU and containers keep the host's clock.
"""

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

# Set for a worker (e.g. libfaketime's LD_PRELOAD and FAKETIME in the lab), never for what
# it runs.
WORKER_ONLY_ENV = ("LD_PRELOAD", "FAKETIME", "FAKETIME_NO_CACHE", "DONT_FAKE_MONOTONIC")


def host_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a host command: ours, minus what only the worker runs under."""
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ONLY_ENV}
    return {**env, **(extra or {})}


async def spawn(
    argv: Sequence[str], *, stdout: int = subprocess.DEVNULL, stderr: int = subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    """Start a step's own command in a new session (its own process group)."""
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=host_env(),
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"{argv[0]} is not installed (run `make setup`)") from exc


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (it leads it: see `spawn`), children included,
    even those that outlived it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def wait_owned(proc: asyncio.subprocess.Process, timeout: float | None = None) -> int:
    """Its exit code. If the caller is cancelled, or `timeout` passes, the process group is
    killed and reaped first: a cancelled step leaves none of its commands running."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except BaseException:  # CancelledError is not an Exception; TimeoutError is
        kill_group(proc)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(proc.wait())
        raise


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
    timeout: float | None = DEFAULT_TIMEOUT_S,
    input_text: str | None = None,
) -> Completed:
    """Run a command to completion; raise RuntimeFailure with its stderr when it fails.
    `timeout` None: the command keeps its own deadline (e.g. under coreutils' `timeout`)."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
            env=host_env(),
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
    """Async `run`: the worker's event loop keeps serving while the command runs; a
    cancelled caller kills the command's process group."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=host_env(env),
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"{argv[0]} is not installed (run `make setup`)") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as exc:
        kill_group(proc)
        await proc.wait()
        raise _failure(argv, None, "", "") from exc
    except BaseException:
        kill_group(proc)
        raise
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
