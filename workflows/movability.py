"""What CRIU cannot move, judged before the freeze from what a container's processes hold.
Pure: services/runtime/movable.py reads the facts from /proc.

A finding that blocks names the cause and the fix (an option of the application, or what
to change) instead of letting the dump fail inside the freeze; one that does not block says
what Ferry does about it. CRIU 4.2.1 is the reference: each rule below was a dump failure
there (docs/machine-facts.md F31).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessFacts:
    """One process of the container, as /proc shows it."""

    pid: int
    comm: str
    fd_targets: tuple[str, ...]  # readlink of each /proc/<pid>/fd/N
    file_locks: int  # `lock:` lines over its fdinfo


@dataclass(frozen=True)
class Finding:
    what: str
    blocking: bool
    detail: str  # the cause and, when blocking, the fix


# anon-inode fds CRIU 4.2.1 cannot dump, with what to do instead.
UNDUMPABLE = {
    "anon_inode:[io_uring]": (
        "io_uring",
        "CRIU 4.2.1 cannot dump an io_uring instance; start the application without it"
        " (MariaDB: --innodb-use-native-aio=0; liburing users: their no-io_uring option)",
    ),
    "anon_inode:[userfaultfd]": (
        "userfaultfd",
        "CRIU cannot dump a userfaultfd the application opened itself",
    ),
    "anon_inode:[perf_event]": (
        "perf events",
        "CRIU cannot dump perf_event fds; stop the profiler inside the container first",
    ),
    "anon_inode:bpf-prog": (
        "BPF programs",
        "CRIU dumps BPF maps but not programs; load them from outside the container",
    ),
}


def _holders(processes: Sequence[ProcessFacts], target: str) -> list[str]:
    return [f"{p.comm}[{p.pid}]" for p in processes if target in p.fd_targets]


def findings(processes: Sequence[ProcessFacts]) -> list[Finding]:
    """Blocking findings first, each naming the processes that hold the thing."""
    found = []
    for target, (what, fix) in UNDUMPABLE.items():
        holders = _holders(processes, target)
        if holders:
            found.append(Finding(what, True, f"{', '.join(holders)} hold(s) {what}: {fix}"))
    locks = sum(p.file_locks for p in processes)
    if locks:
        holders = [f"{p.comm}[{p.pid}]" for p in processes if p.file_locks]
        found.append(
            Finding(
                "file locks",
                False,
                f"{locks} file lock(s) held by {', '.join(holders)}: dumped and restored"
                " with them (Ferry runs CRIU with file-locks)",
            )
        )
    return found


def refusal(found: Sequence[Finding], container: str) -> str | None:
    """Why the container cannot move, or None when nothing blocks."""
    blocking = [f.detail for f in found if f.blocking]
    if not blocking:
        return None
    return f"{container} cannot be moved by CRIU: " + "; ".join(blocking)
