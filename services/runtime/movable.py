"""The facts workflows/movability.py judges, read from /proc for every process of a
container (every process in its init's PID namespace). A process that exits while it is
read is left out: it holds nothing any more."""

from __future__ import annotations

import os
from pathlib import Path

from workflows.movability import ProcessFacts


def container_pids(init_pid: int) -> list[int]:
    """The init and every process sharing its PID namespace, from this host's /proc."""
    try:
        namespace = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                pids.append(int(entry))
        except OSError:
            continue
    return sorted(pids)


def process_facts(pid: int) -> ProcessFacts | None:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    targets, locks = [], 0
    for fd in fds:
        try:
            targets.append(os.readlink(fd_dir / fd))
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue  # closed meanwhile
        locks += sum(1 for line in info.splitlines() if line.startswith("lock:"))
    return ProcessFacts(
        pid=pid, comm=comm, fd_targets=tuple(sorted(set(targets))), file_locks=locks
    )


def container_facts(init_pid: int) -> list[ProcessFacts]:
    return [f for pid in container_pids(init_pid) if (f := process_facts(pid)) is not None]
