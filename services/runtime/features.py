"""What kinds of migration this host's kernel and CRIU allow, as it tells the fleet."""

from __future__ import annotations

from pathlib import Path

from services.runtime import criu
from services.runtime.precopy import mem_dirty_track_available

PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")
LAZY_PIPE_BYTES = 4 << 20  # the source's page server grows its pipe this far (machine facts F4)


async def host_features() -> tuple[tuple[str, ...], dict[str, str]]:
    """The features this host has, and for each one it lacks, why."""
    have: list[str] = []
    missing: dict[str, str] = {}
    uffd, said = await criu.feature("uffd-noncoop")
    pipe_max = int(PIPE_MAX_SIZE.read_text()) if PIPE_MAX_SIZE.exists() else 0
    if not uffd:
        missing["lazy_pages"] = f"userfaultfd (uffd-noncoop) unavailable: {said}"
    elif pipe_max < LAZY_PIPE_BYTES:
        missing["lazy_pages"] = (
            f"fs.pipe-max-size is {pipe_max}; the page server needs {LAZY_PIPE_BYTES}"
            " without CAP_SYS_RESOURCE (make setup sets it)"
        )
    else:
        have.append("lazy_pages")
    dirty, why = await mem_dirty_track_available()
    if dirty:
        have.append("mem_dirty_track")
    else:
        missing["mem_dirty_track"] = why
    return tuple(have), missing
