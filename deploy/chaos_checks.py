"""What `make chaos` sees at the end of a cell, from outside Ferry, and the cell's verdict.

Where the container really runs is read from each host (runc's state, the cgroup's tasks,
an answer from the copy's own loopback), never from Ferry's records; the placement is read
raw from the KV bucket. The verdict compares the two. Pure verdict logic, thin probes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy.workloads import PORT

# A cell with any of these verdicts fails `make chaos`; the first one found names the cell.
FATAL = ("lost", "two-copies", "unfinished", "placement-wrong", "not-rolled-forward",
         "failed-without-reason")  # fmt: skip
# Reported, and `make chaos` fails on them too, but the container itself is fine.
FLAWED = ("leftovers", "not-fired")
VERDICTS = ("ok", "failed", "pending", *FATAL, *FLAWED)


@dataclass
class Seen:
    """The container's whereabouts after a cell, host by host."""

    placement_host: str = ""  # "" when the placement could not be read
    placement_state: str = ""
    placement_note: str = ""  # why it could not be read: bucket missing, no key, no answer
    runc: dict[str, str] = field(default_factory=dict)  # host -> runc status ("" = none)
    runnable: list[str] = field(default_factory=list)  # hosts where it can run its own code
    answering: list[str] = field(default_factory=list)  # hosts whose copy answered on loopback
    client_ok: bool = False  # the client's view: token, counters and buffer intact


def runc_state(runc_root: Path, name: str) -> tuple[str, int | None]:
    """runc's status of the container on one host ("" if runc has none) and its init pid."""
    out = subprocess.run(
        ["runc", "--root", str(runc_root), "state", name], capture_output=True, text=True
    )
    if out.returncode != 0:
        return "", None
    try:
        state = json.loads(out.stdout)
    except ValueError:
        return "?", None
    return str(state.get("status", "?")), (int(state["pid"]) if state.get("pid") else None)


def runc_status(runc_root: Path, name: str) -> str:
    return runc_state(runc_root, name)[0]


def answers_on_loopback(pid: int | None, timeout: float = 3.0) -> bool:
    """Whether the copy whose init is `pid` answers its own TCP service, asked inside its
    network namespace (a frozen or stopped copy accepts the connection in the kernel but
    never replies). By pid: the netns files are mounts in the host's mount namespace."""
    if pid is None:
        return False
    code = (
        "import json,sys\nfrom deploy.workloads import query\n"
        f"print(json.dumps(query('127.0.0.1', {PORT}, timeout={timeout})))"
    )
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["nsenter", "-t", str(pid), "-n", sys.executable, "-c", code],
            capture_output=True, text=True, cwd=root, timeout=timeout + 10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and '"token"' in out.stdout


def verdict(
    *,
    state: str,
    error: str,
    fired: bool,
    seen: Seen,
    confirmed_twice: bool,
    leftovers: list[str],
    must_end_on: str = "",
) -> tuple[str, list[str]]:
    """The cell's verdict (the worst problem) and every problem found, in words."""
    problems: list[tuple[str, str]] = []
    running = sorted(set(seen.runnable) | set(seen.answering))
    if state.startswith("unfinished"):
        problems.append(("unfinished", "the migration never ended"))
    if not running or not seen.client_ok:
        problems.append(
            ("lost", f"running on {running or 'no host'}, client view intact: {seen.client_ok}")
        )
    if confirmed_twice or len(running) > 1 or len(seen.answering) > 1:
        problems.append(("two-copies", f"runnable {seen.runnable}, answering {seen.answering}"))
    if len(running) == 1 and seen.placement_host != running[0]:
        where = seen.placement_host or f"unreadable ({seen.placement_note})"
        problems.append(("placement-wrong", f"placement {where}, runs on {running[0]}"))
    elif len(running) == 1 and seen.placement_state not in ("running", ""):
        problems.append(("placement-wrong", f"placement still {seen.placement_state}"))
    if must_end_on and running and running != [must_end_on]:
        problems.append(("not-rolled-forward", f"must end on {must_end_on}, runs on {running}"))
    if state.startswith("failed") and not error:
        problems.append(("failed-without-reason", "the saga ended failed with no error"))
    if leftovers:
        problems.append(("leftovers", ", ".join(leftovers)))
    if not fired:
        problems.append(("not-fired", "the fault did not fire"))
    order = {v: i for i, v in enumerate((*FATAL, *FLAWED))}
    problems.sort(key=lambda p: order[p[0]])
    if problems:
        return problems[0][0], [f"{v}: {why}" for v, why in problems]
    if state.startswith("failed"):
        return "failed", [f"failed: {error}"]
    return "ok", []
