"""CRIU as Ferry uses it: the binary, its check, its page server and its statistics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime.proc import arun

CRIU = os.environ.get("FERRY_CRIU", "/usr/local/sbin/criu")
PAGE_SERVER_READY_S = 10.0


async def check() -> None:
    """`criu check` must pass on a host before anything is dumped to or restored on it."""
    done = await arun([CRIU, "check"], check=False, timeout=30)
    if done.returncode != 0 or "Looks good" not in done.stdout + done.stderr:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeFailure(f"criu check failed: {said[-1] if said else 'no output'}")


async def start_page_server(images: Path, address: str, port: int) -> int:
    """Start a page server that takes one dump's pages, then exits.

    It runs under a small shell that writes its exit code to images/page-server.rc, so
    whoever restores later learns whether every page arrived, even if this worker has
    restarted in between. Returns the page server's pid.
    """
    images.mkdir(parents=True, exist_ok=True)
    (images / "page-server.rc").unlink(missing_ok=True)
    read_end, write_end = os.pipe()
    criu = [
        CRIU, "page-server", "--images-dir", str(images), "--work-dir", str(images),
        "--address", address, "--port", str(port), "--status-fd", str(write_end),
        "-v4", "-o", "page-server.log",
    ]  # fmt: skip
    script = (
        f"{shlex.join(criu)} & echo $! > {images}/page-server.pid;"
        f" wait $!; echo $? > {images}/page-server.rc"
    )
    try:
        subprocess.Popen(
            ["sh", "-c", script],
            pass_fds=(write_end,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        os.close(write_end)
    loop = asyncio.get_running_loop()
    try:
        ready = await asyncio.wait_for(
            loop.run_in_executor(None, os.read, read_end, 1), PAGE_SERVER_READY_S
        )
    finally:
        os.close(read_end)
    if ready != b"\0":
        raise RuntimeFailure(
            f"criu page-server did not start: {tail(images / 'page-server.log')}", retryable=True
        )
    return int((images / "page-server.pid").read_text())


async def page_server_result(images: Path, timeout: float) -> int | None:
    """The page server's exit code once it has exited, or None if it still runs."""
    rc_file = images / "page-server.rc"
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(rc_file.read_text())
        if asyncio.get_running_loop().time() > deadline:
            return None
        await asyncio.sleep(0.05)


def stop_page_server(images: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((images / "page-server.pid").read_text()), 9)


def tail(log: Path, lines: int = 12) -> str:
    """What an SRE needs from a CRIU log: its errors and warnings, then its last lines."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {log.name})"
    flagged = [line for line in text if "Error" in line or "Warn" in line][-lines:]
    last = [line for line in text[-3:] if line not in flagged]
    return "\n".join([f"{log.name}:", *flagged, *last])


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
