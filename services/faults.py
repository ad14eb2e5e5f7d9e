"""Test-only fault injection, for `make chaos` and the fault tests. No NATS here.

A fault rides in the migration's facts (`inject_fault`, accepted by intake only on hosts
started with FERRY_ALLOW_FAULTS=1). Each fires once per migration: a marker in the host's
state dir remembers it, so the command JetStream delivers again after a killed worker runs
normally — which is exactly what the chaos suite wants to see survive.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from schemas.v1.migrations import StepCommand

log = logging.getLogger("ferry.faults")


def enabled() -> bool:
    return os.environ.get("FERRY_ALLOW_FAULTS") == "1"


def carried(cmd: StepCommand) -> set[str]:
    """The faults the migration carries ("restore+kill:resume_source:before" is two)."""
    value = cmd.facts.get("inject_fault")
    return set(value.split("+")) if isinstance(value, str) and enabled() else set()


def fires(cmd: StepCommand, fault: str, state_dir: Path) -> bool:
    """True exactly once for the migration if it carries `fault`."""
    if fault not in carried(cmd):
        return False
    marker = state_dir / "chaos" / f"{cmd.migration_id}.{fault.replace(':', '-')}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{time.time()}\n")
    log.critical("chaos: %s fires for migration %s", fault, cmd.migration_id)
    return True


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
