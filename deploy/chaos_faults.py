"""The faults `make chaos` fires from outside that need the migration record or the bus:
killing or freezing the worker that runs a step (as the record names it), the destination
cut off right after its commit's compare-and-set, and the cells that wait for tools other
work adds (`ferry bootstrap`, `ferry reconcile`, workers under faketime)."""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.runtime.proc import process_state

FERRY = str(Path(sys.executable).parent / "ferry")
ROOT = Path(__file__).resolve().parent.parent
LIBFAKETIME = "/usr/lib/*/faketime/libfaketime.so.1"


def running_step(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The record's entry for step `name` while it runs (its role and host say who runs it)."""
    for step in reversed(record.get("steps", [])):
        if step.get("name") == name and step.get("status") == "running":
            return dict(step)
    return None


def wait_running_step(
    read_record: Callable[[], dict[str, Any]], name: str, timeout: float = 10.0
) -> dict[str, Any] | None:
    """The step as the record shows it running; the event can come before the record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = running_step(read_record(), name)
        if step is not None:
            return step
        time.sleep(0.01)
    return None


def signal_worker(
    pids: Callable[[], dict[tuple[str, str], int]], host: str, role: str, sig: int
) -> int | None:
    """Send `sig` to `role`'s worker on `host` (its pid read now, not at the cell's start)."""
    pid = pids().get((host, role))
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid


def freeze_worker(
    pids: Callable[[], dict[tuple[str, str], int]], host: str, role: str, seconds: float
) -> tuple[bool, str]:
    """SIGSTOP the worker for `seconds`, then SIGCONT it: alive, but silent meanwhile."""
    pid = signal_worker(pids, host, role, signal.SIGSTOP)
    if pid is None:
        return False, f"no {role} worker on {host} to freeze"
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return True, f"{role} on {host} (pid {pid}) frozen for {seconds:.0f} s, then continued"


def wait_stopped(
    pids: Callable[[], dict[tuple[str, str], int]], host: str, role: str, within: float
) -> int | None:
    """The pid of the worker once it is stopped (SIGSTOP, state T), or None."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pid = pids().get((host, role))
        if pid is not None and process_state(pid) == "T":
            return pid
        time.sleep(0.02)
    return None


def cli_has(command: str) -> bool:
    """Whether `ferry` offers a subcommand (other work adds some)."""
    out = subprocess.run([FERRY, "--help"], capture_output=True, text=True).stdout
    listed = re.search(r"\{([a-z,-]+)\}", out)
    return listed is not None and command in listed.group(1).split(",")


@functools.lru_cache
def pending_reason(fault: str) -> str:
    """Why a cell cannot run yet ("" when it can)."""
    if fault in ("kv-lost", "store-lost"):
        missing = [c for c in ("bootstrap", "reconcile") if not cli_has(c)]
        if missing:
            return (
                f"needs `ferry {' and ferry '.join(missing)}` to recreate the topology and"
                " rebuild placements from the hosts' records"
            )
        return ""
    if fault == "clock":
        if not glob.glob(LIBFAKETIME):
            return "needs libfaketime (the Debian package faketime)"
        if not (ROOT / "services" / "worker_clock.py").exists():
            return "the lab cannot start one host's workers under faketime yet"
        return ""
    return ""


def skew_workers(
    lab: str,
    host: str,
    offset: str,
    pids: Callable[[], dict[tuple[str, str], int]],
    up: Callable[[dict[str, str]], None],
) -> tuple[bool, str]:
    """Restart `host`'s agent so its workers run with their wall clock `offset` off
    (FERRY_WORKER_FAKETIME; "" puts it right again). True once all four run so."""
    from deploy.lab.lab import agent_pid
    from deploy.lab.layout import LabLayout

    layout = LabLayout(lab)
    before = {role: pid for (h, role), pid in pids().items() if h == host}
    agent = agent_pid(layout, host)
    if agent is not None:
        os.kill(agent, signal.SIGTERM)  # the agent stops its workers on its way out
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent_pid(layout, host) is not None:
            time.sleep(0.2)
    up({"FERRY_WORKER_FAKETIME": f"{host}={offset}" if offset else ""})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = {role: pid for (h, role), pid in pids().items() if h == host}
        fresh = {role: pid for role, pid in now.items() if pid != before.get(role)}
        if len(fresh) == 4:
            skewed = [role for role, pid in fresh.items() if _faketime_of(pid) == offset]
            if offset and len(skewed) == 4:
                return True, f"{host}'s workers run with their clock {offset} (libfaketime)"
            if not offset and not skewed:
                return True, f"{host}'s workers run on the host's clock again"
            return False, f"{host}'s workers restarted, faketime on {skewed or 'none'}"
        time.sleep(0.5)
    return False, f"{host}'s workers did not come back within 60 s"


def _faketime_of(pid: int) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return ""
    found = [e[len(b"FAKETIME=") :] for e in environ if e.startswith(b"FAKETIME=")]
    return found[0].decode() if found else ""


def reconcile(env: dict[str, str], placed: Callable[[], bool], timeout: float = 60.0) -> str:
    """Recreate the topology and rebuild placements the way an operator would: bootstrap,
    then reconcile until the placement is back (hosts re-register after a lost store)."""
    said = []
    out = subprocess.run([FERRY, "bootstrap"], env=env, capture_output=True, text=True)
    said.append(f"ferry bootstrap: exit {out.returncode}")
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        argv = ["reconcile", *_write_flag()]
        out = subprocess.run([FERRY, *argv], env=env, capture_output=True, text=True)
        if placed():
            break
        time.sleep(2.0)
    said.append(f"ferry {' '.join(argv)} x{tries}: exit {out.returncode}, placed {placed()}")
    if out.returncode:
        said.append((out.stderr or out.stdout).strip()[-200:])
    return "; ".join(said)


def _write_flag() -> list[str]:
    text = subprocess.run([FERRY, "reconcile", "--help"], capture_output=True, text=True).stdout
    return next(([f] for f in ("--apply", "--write", "--yes") if f in text), [])


def record_of(env: dict[str, str], migration_id: str) -> dict[str, Any]:
    out = subprocess.run(
        [FERRY, "status", migration_id, "--json"], env=env, capture_output=True, text=True
    )
    try:
        return dict(json.loads(out.stdout or "{}"))
    except ValueError:
        return {}
