"""CRIU's kernel-feature cache (criu.kdat) kept warm on this host.

CRIU probes the kernel on every run (tens of ms, inside the freeze) unless it finds its
cache, and it keeps the cache only on a tmpfs, so that a reboot cannot leave a stale one.
`make setup` builds CRIU with RUNDIR=/run/ferry-criu; this makes sure a tmpfs is there
(/run is one on most machines, not on every VM) before anything runs CRIU.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger("ferry.kdat")

CACHE_DIR = Path("/run/ferry-criu")  # CRIU's RUNDIR (deploy/setup/setup.sh CRIU_RUNDIR)
MOUNTINFO = Path("/proc/self/mountinfo")


def filesystem_of(path: Path, mountinfo: str) -> str | None:
    """The type of the filesystem `path` is on: that of its deepest mount point."""
    best, fstype = -1, None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        after = line.split(" - ", 1)[1].split()
        if (path == mount_point or mount_point in path.parents) and len(mount_point.parts) > best:
            best, fstype = len(mount_point.parts), after[0] if after else None
    return fstype


def ensure_cache_dir(cache_dir: Path = CACHE_DIR) -> bool:
    """A tmpfs at `cache_dir` (mounted if the directory is on anything else); whether CRIU
    can keep its cache there. A failure is logged, never raised: without the cache CRIU
    only runs slower."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if filesystem_of(cache_dir, MOUNTINFO.read_text()) == "tmpfs":
            return True
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "ferry-criu", str(cache_dir)],
            check=True, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("CRIU's kernel-feature cache stays cold (%s): every CRIU run probes", exc)
        return False
    log.info("a tmpfs on %s keeps CRIU's kernel-feature cache", cache_dir)
    return True
