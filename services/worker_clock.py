"""Test only: one host's Ferry workers with their wall clock off, under libfaketime.

`FERRY_WORKER_FAKETIME="h2=+30s,h1=-30s"` (honoured with FERRY_ALLOW_FAULTS=1) makes the
agent of each host named there start its workers with libfaketime preloaded. Only the
workers: the agent itself, and everything a worker runs (runc, CRIU, the container) keep
the host's clock — services.runtime.proc strips the preload from every command.
"""

from __future__ import annotations

import glob
import os

from services import faults
from services.errors import RuntimeFailure

OFFSETS_VAR = "FERRY_WORKER_FAKETIME"
LIBFAKETIME = "/usr/lib/*/faketime/libfaketime.so.1"


def worker_env(host: str) -> dict[str, str] | None:
    """The environment for `host`'s workers if their clock is to be off, else None
    (they inherit the agent's)."""
    spec = os.environ.get(OFFSETS_VAR, "")
    offsets = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    offset = offsets.get(host, "").strip()
    if not offset or not faults.enabled():
        return None
    found = sorted(glob.glob(LIBFAKETIME))
    if not found:
        raise RuntimeFailure(f"{OFFSETS_VAR} needs libfaketime (the Debian package faketime)")
    # Monotonic clocks stay true: only the wall clock is off, as on a badly synced host.
    return {**os.environ, "LD_PRELOAD": found[0], "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}
