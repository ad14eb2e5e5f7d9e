"""How the destination's lazy-pages daemon is doing, read from what it leaves on disk.

Post-copy falls back to the source only when pages stop arriving — the daemon or the source
died, or nothing arrived for a while — never because a large container takes long. The
daemon logs every copy into the process at -v4 (`uffd_copy`, and now and then
"UFFD transferred pages: (copied/total)"), so its log growing is the sign of life.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from services.runtime import paths

_TRANSFERRED = re.compile(rb"UFFD transferred pages: \((\d+)/(\d+)\)")
TAIL_BYTES = 8192


@dataclass(frozen=True)
class DaemonView:
    """One look at the daemon: its exit code if it ended, whether it still lives, how much
    it has logged (grows with every page), and its last page count if it said one."""

    rc: int | None
    alive: bool
    logged_bytes: int
    copied_pages: int | None = None
    total_pages: int | None = None


def _alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"criu" in cmdline and b"lazy-pages" in cmdline


def look(images: Path, log: Path) -> DaemonView:
    rc: int | None = None
    with contextlib.suppress(OSError, ValueError):
        rc = int(paths.rc_file(images, paths.LAZY_PAGES).read_text())
    try:
        size = log.stat().st_size
        with log.open("rb") as f:
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError:
        size, tail = 0, b""
    counts = _TRANSFERRED.findall(tail)
    copied, total = (int(counts[-1][0]), int(counts[-1][1])) if counts else (None, None)
    alive = rc is None and _alive(paths.pid_file(images, paths.LAZY_PAGES))
    return DaemonView(rc, alive, size, copied, total)
