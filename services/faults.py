"""Test-only fault injection, for `make chaos` and the fault tests. No NATS here.

A migration carries its faults in the record (`options.inject_fault`, accepted by intake
only on hosts started with FERRY_ALLOW_FAULTS=1). Each host has one `FaultPlan`: the runner
arms it with the record's faults while a step runs, and the places where a fault strikes —
the runner (kill, duplicate) and the runtime (a damaged image before restore, a dying
lazy-pages daemon, corrupted transfer bytes) — ask it. One-shot faults fire once per
migration: a marker in the host's state dir remembers it, so the command JetStream delivers
again after a killed worker runs normally — which is exactly what chaos wants to see survive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from schemas.v2.migrations import MigrationRecord

log = logging.getLogger("ferry.faults")


def enabled() -> bool:
    return os.environ.get("FERRY_ALLOW_FAULTS") == "1"


class FaultPlan:
    """The faults armed on this host, by migration; never fires where faults are off."""

    def __init__(self, state_dir: Path, *, allowed: bool | None = None) -> None:
        self.state_dir = state_dir
        self.allowed = enabled() if allowed is None else allowed
        self._armed: dict[str, frozenset[str]] = {}

    @contextlib.contextmanager
    def armed(self, record: MigrationRecord) -> Iterator[None]:
        """Arm the record's faults while one of its steps runs here."""
        spec = record.options.inject_fault
        if not (self.allowed and spec):
            yield
            return
        self._armed[record.id] = frozenset(spec.split("+"))
        try:
            yield
        finally:
            self._armed.pop(record.id, None)

    def carries(self, migration_id: str, fault: str) -> bool:
        """Whether the migration carries `fault` (it strikes every time it is asked)."""
        return fault in self._armed.get(migration_id, frozenset())

    def fires(self, migration_id: str, fault: str) -> bool:
        """True exactly once for the migration if it carries `fault`."""
        if not self.carries(migration_id, fault):
            return False
        marker = self.state_dir / "chaos" / f"{migration_id}.{fault.replace(':', '-')}"
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{time.time()}\n")
        log.critical("chaos: %s fires for migration %s", fault, migration_id)
        return True

    def once(self, migration_id: str, fault: str) -> OneShot:
        """A flag for a runtime call: true the first time it is asked, if `fault` fires."""
        return OneShot(self.fires(migration_id, fault))


NO_FAULTS = FaultPlan(Path("/nonexistent"), allowed=False)


def die() -> None:
    """SIGKILL this process: no clean-up, no ack — a crash, for real."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class OneShot:
    """A flag that is true the first time it is asked."""

    def __init__(self, armed: bool) -> None:
        self.armed = armed

    def __call__(self) -> bool:
        fired, self.armed = self.armed, False
        return fired


PAUSE_BEFORE_CAS_S = 2.0  # long enough for chaos to cut what NATS sends this host


def go_silent(seconds: float | None = None) -> None:
    """SIGSTOP this process, as if the network cut it off: no lease renewed, no ack, no
    report. A detached shell sends SIGCONT after `seconds` (FERRY_FAULT_SILENT_S by
    default) — the cut healed."""
    if seconds is None:
        seconds = float(os.environ.get("FERRY_FAULT_SILENT_S", "120"))
    log.critical("chaos: going silent for %.0f s", seconds)
    for handler in logging.getLogger().handlers:
        handler.flush()
    subprocess.Popen(
        ["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.kill(os.getpid(), signal.SIGSTOP)
