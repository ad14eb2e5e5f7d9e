"""runc, driven through its command line with a per-host state root."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime import cmdlines
from services.runtime.proc import arun, host_env

log = logging.getLogger("ferry.runc")

PAUSE_ATTEMPTS = 4
PAUSE_RETRY_S = 0.05


@dataclass(frozen=True)
class RuncState:
    """A container as runc reports it."""

    name: str
    status: str
    pid: int | None


class Runc:
    """One host's runc: its own --root, so simulated hosts never see each other's state."""

    def __init__(self, root: Path, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def _argv(self, *args: str) -> list[str]:
        return cmdlines.runc(self, *args)

    async def run_detached(
        self,
        name: str,
        bundle: Path,
        log_file: Path,
        timeout: float = 60.0,
        stdio: int = subprocess.DEVNULL,
    ) -> None:
        """Start the container's process in the background.

        runc's own stdio is inherited by the container: stdin is /dev/null, stdout and
        stderr `stdio` — a pipe to its logger (CRIU dumps a pipe and runc restores it
        onto a new one; a host file or socket there would make CRIU refuse the dump).
        runc's words go to `log_file` instead.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        argv = cmdlines.runc_run_detached(self, name, bundle, log_file)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=stdio,
            stderr=stdio,
            env=host_env(),  # the container never inherits a worker-only LD_PRELOAD
        )
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise RuntimeFailure(f"runc run {name} timed out after {timeout:.0f}s") from exc
        if proc.returncode != 0:
            errors = log_errors(log_file)
            raise RuntimeFailure(
                f"runc run {name} exited {proc.returncode}: {errors[-1] if errors else 'no log'}",
                log_tail="\n".join(errors[-20:]),
            )

    async def list(self) -> list[RuncState]:
        if not self.root.exists():
            return []
        done = await arun(self._argv("list", "--format", "json"))
        entries = json.loads(done.stdout or "null") or []
        return [
            RuncState(name=e["id"], status=e["status"], pid=e.get("pid") or None) for e in entries
        ]

    def may_know(self, name: str) -> bool:
        """Whether runc may have a container of that name: its state directory is there.
        False is sure (runc keeps every container under its root); True needs `state`.
        A file check instead of a runc run where a freeze waits for the answer."""
        return (self.root / name).exists()

    async def state(self, name: str) -> RuncState | None:
        done = await arun(self._argv("state", name), check=False)
        if done.returncode != 0:
            return None
        e = json.loads(done.stdout)
        return RuncState(name=e["id"], status=e["status"], pid=e.get("pid") or None)

    async def kill(self, name: str, signal: str = "KILL", *, all_processes: bool = False) -> None:
        every = ["--all"] if all_processes else []
        await arun(self._argv("kill", *every, name, signal), check=False)

    async def pause(self, name: str) -> None:
        """Freeze the container's processes in their freezer cgroup; `resume` thaws them.

        The v1 freezer can stay FREEZING while a task is busy in the kernel (a fork, a
        page fault under memory pressure); runc then thaws the cgroup and says "unable to
        freeze". On a loaded host that is a matter of chance, so try again a few times
        before a whole move rolls back for it (docs/machine-facts.md F34)."""
        for attempt in range(1, PAUSE_ATTEMPTS + 1):
            try:
                await arun(self._argv("pause", name))
                return
            except RuntimeFailure as exc:
                if "unable to freeze" not in exc.reason or attempt == PAUSE_ATTEMPTS:
                    raise
                log.warning("runc pause %s: unable to freeze (attempt %d); again", name, attempt)
                await asyncio.sleep(PAUSE_RETRY_S)

    async def resume(self, name: str) -> None:
        """Thaw the container's freezer cgroup."""
        await arun(cmdlines.runc_resume(self, name))

    async def delete(self, name: str) -> None:
        """Force-delete: kills what still runs, removes runc's state and the cgroups."""
        done = await arun(self._argv("delete", "--force", name), check=False)
        if done.returncode != 0 and await self.state(name) is not None:
            raise RuntimeFailure(f"runc delete {name} failed: {done.stderr.strip()}")


def log_errors(log_file: Path) -> list[str]:
    """The error messages in a runc JSON log, oldest first."""
    try:
        lines = log_file.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            found.append(" ".join(str(entry.get("msg", "")).split()))
    return found
