"""CRIU as Ferry uses it: its check, background CRIU processes and how they ended, stats."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import subprocess
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime import paths
from services.runtime.cmdlines import CRIU, STATUS_FD, criu_check, criu_lazy_pages, criu_page_server
from services.runtime.proc import arun, host_env
from services.tls import TlsFiles

__all__ = ["CRIU", "STATUS_FD"]  # re-exported: callers name the binary as criu.CRIU

PAGE_SERVER_READY_S = 10.0
STATUS_FILE_FD = 9  # the fd a background CRIU writes its status to (a file)
STATUS_POLL_S = 0.005  # a few ms on the freeze's path at most
PID_GRACE_S = 5.0  # for the shell to write the pid of a process that is ready already


async def check() -> None:
    """`criu check` must pass on a host before anything is dumped to or restored on it."""
    done = await arun(criu_check(), check=False, timeout=30)
    if done.returncode != 0 or "Looks good" not in done.stdout + done.stderr:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeFailure(f"criu check failed: {said[-1] if said else 'no output'}")


Check = tuple[str, bool, str]  # a dry run's check: what, whether it passed, detail


async def check_verdict() -> Check:
    """`criu check` as a dry run reports it."""
    try:
        await check()
    except RuntimeFailure as exc:
        return ("criu", False, exc.reason)
    return ("criu", True, "criu check: looks good")


async def start_background(
    argv: list[str], images: Path, tag: str, ready_timeout_s: float = PAGE_SERVER_READY_S
) -> int:
    """Start a long-lived CRIU (or runc-driving-CRIU) process and wait for its `\\0` on
    --status-fd (the caller puts STATUS_FD where the fd number goes).

    It runs under a small shell that writes its exit code to images/TAG.rc, so whoever
    looks later learns how it ended, even if this worker has restarted in between.
    Returns its pid (also in images/TAG.pid).
    """
    images.mkdir(parents=True, exist_ok=True)
    pid_file, rc_file = paths.pid_file(images, tag), paths.rc_file(images, tag)
    status_file = images / f"{tag}.status"
    for stale in (rc_file, status_file):
        stale.unlink(missing_ok=True)
    # The status goes to a file, not a pipe to this worker: if the worker dies while CRIU
    # works, a pipe with no reader fails CRIU's notification and aborts a dump midway
    # (runc: "criu failed: type NOTIFY"), leaving the container's tasks in CRIU's hands.
    command = [str(STATUS_FILE_FD) if a == STATUS_FD else a for a in argv]
    script = (
        f"{shlex.join(command)} {STATUS_FILE_FD}>{shlex.quote(str(status_file))} &"
        f" echo $! > {pid_file}; wait $!; echo $? > {rc_file}"
    )
    subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=host_env(),
    )
    return await wait_ready(images, tag, ready_timeout_s)


async def wait_ready(images: Path, tag: str, timeout_s: float) -> int:
    """Wait for a background process started for these images (by this worker or by an
    earlier one that died) to report ready; its pid. Killed if it does not in time."""
    pid_file, rc_file = paths.pid_file(images, tag), paths.rc_file(images, tag)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not _ready(images / f"{tag}.status"):
        if rc_file.exists() or loop.time() > deadline:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), 9)
            said = "exited before it was ready" if rc_file.exists() else "did not get ready in time"
            raise RuntimeFailure(f"{tag} {said}", log_tail=tail(images / f"{tag}.log"))
        await asyncio.sleep(STATUS_POLL_S)
    # The shell writes the pid after it started the process, which can be ready first
    # (a loaded host): the file may not be there yet, or be there and still empty.
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(pid_file.read_text())
        if loop.time() > deadline + PID_GRACE_S:
            raise RuntimeFailure(f"{tag} is ready but its pid was never written to {pid_file}")
        await asyncio.sleep(STATUS_POLL_S)


def _ready(status_file: Path) -> bool:
    try:
        return status_file.read_bytes()[:1] == b"\0"
    except OSError:
        return False


async def start_page_server(
    images: Path, address: str, port: int, *, tls: TlsFiles | None = None
) -> int:
    """Start a page server that takes one dump's pages, then exits (rc in page-server.rc)."""
    try:
        return await start_background(
            criu_page_server(images, address, port, tls=tls), images, paths.PAGE_SERVER
        )
    except RuntimeFailure as exc:
        raise RuntimeFailure(
            f"criu page-server did not start: {exc.reason}", log_tail=exc.log_tail, retryable=True
        ) from exc


async def start_lazy_pages(
    images: Path, source: str, port: int, *, tls: TlsFiles | None = None
) -> int:
    """The destination's lazy-pages daemon: it serves the restored process's page faults
    from the source's page server and pulls the rest in the background, then exits 0."""
    argv = criu_lazy_pages(images, source, port, tls=tls)
    return await start_background(argv, images, paths.LAZY_PAGES)


def background_pid(images: Path, tag: str) -> int | None:
    """The pid of a background process started here for this migration, if it still runs."""
    try:
        pid = int(paths.pid_file(images, tag).read_text())
    except (OSError, ValueError):
        return None
    if paths.rc_file(images, tag).exists():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


async def background_result(images: Path, tag: str, timeout: float) -> int | None:
    """A background process's exit code once it has exited, or None if it still runs."""
    rc_file = paths.rc_file(images, tag)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(rc_file.read_text())
        if asyncio.get_running_loop().time() > deadline:
            return None
        await asyncio.sleep(0.05)


async def page_server_result(images: Path, timeout: float) -> int | None:
    """The page server's exit code once it has exited, or None if it still runs."""
    return await background_result(images, paths.PAGE_SERVER, timeout)


def stop_page_server(images: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(paths.pid_file(images, paths.PAGE_SERVER).read_text()), 9)


def tail(log: Path, lines: int = 12) -> str:
    """What an SRE needs from a CRIU log: its errors and warnings, then its last lines."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {log.name})"
    flagged = [line for line in text if "Error" in line or "Warn" in line][-lines:]
    last = [line for line in text[-3:] if line not in flagged]
    return "\n".join([f"{log.name}:", *flagged, *last])


# CRIU errors that are no cause: CRIU cannot raise its own open-files limit where root
# lacks CAP_SYS_RESOURCE (this VM), says so as an error on every run, and goes on.
HARMLESS_ERRORS = ("Can't setup RLIMIT_NOFILE for self",)
_LOG_PREFIX = re.compile(r"^\(\s*[0-9.]+\)\s*(pie: \d+: )?")


def cause(log: Path) -> str | None:
    """The first error in a CRIU log that is not HARMLESS_ERRORS, without its timestamp:
    what failed, where runc only says "criu failed"."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in text:
        if "Error (" in line and not any(h in line for h in HARMLESS_ERRORS):
            return _LOG_PREFIX.sub("", line).strip()
    return None


def load_stats(path: Path) -> dict[str, int]:
    """CRIU's own statistics (stats-dump / stats-restore), decoded with pycriu."""
    try:
        import pycriu

        with path.open("rb") as f:
            image = pycriu.images.load(f)
    except Exception:  # statistics are nice to have, never a reason to fail a move
        return {}
    entries = image.get("entries") or [{}]
    section: dict[str, object] = next(iter(entries[0].values()), {})
    return {k: int(v) for k, v in section.items() if isinstance(v, int)}


async def feature(name: str) -> tuple[bool, str]:
    """`criu check --feature NAME`: whether it works here, and CRIU's own words."""
    done = await arun(criu_check(name), check=False, timeout=30)
    said = " ".join((done.stdout + done.stderr).split())
    return done.returncode == 0, said


def pagemap_pages(images: Path) -> int:
    """Memory pages a dump describes (its pagemap images), whether written or left lazy.

    A lazy dump's own statistics are not usable (its page server restarts the counters),
    so post-copy counts what it serves from here.
    """
    total = 0
    try:
        import pycriu

        for pagemap in images.glob("pagemap-*.img"):
            with pagemap.open("rb") as f:
                entries = pycriu.images.load(f).get("entries") or []
            total += sum(int(e.get("nr_pages", 0)) for e in entries[1:])
    except Exception:  # a count for the record, never a reason to fail a move
        return 0
    return total
