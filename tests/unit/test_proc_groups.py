"""A step's own commands: cancelling the step kills their whole process group (what they
started too), and they never inherit what only a worker runs under (libfaketime)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from services.runtime.proc import arun, spawn, wait_owned


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


async def pids_in(path: Path, count: int) -> list[int]:
    for _ in range(100):
        if path.exists() and len(path.read_text().split()) >= count:
            return [int(p) for p in path.read_text().split()]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} never listed {count} pids")


async def test_cancelling_a_step_kills_its_command_and_what_that_started(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # Like runc driving CRIU: a child that starts its own child, both long-lived.
    script = f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    proc = await spawn(["sh", "-c", script], stdout=subprocess.DEVNULL)
    waiting = asyncio.create_task(wait_owned(proc))
    started = await pids_in(pids, 2)
    await asyncio.sleep(0.1)  # the step is waiting on it (not cancelled before it began)
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # a group of its own
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(50):
        if not any(alive(p) for p in started):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(p) for p in started), started


async def test_a_timeout_kills_the_group_and_says_so(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = await spawn(["sh", "-c", f"sleep 300 & echo $! >> {pids}; wait"])
    with pytest.raises(TimeoutError):
        await wait_owned(proc, timeout=0.5)
    (grandchild,) = await pids_in(pids, 1)
    await asyncio.sleep(0.2)
    assert not alive(grandchild)


async def test_commands_do_not_inherit_the_workers_faketime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent/libfaketime.so.1")
    monkeypatch.setenv("FAKETIME", "+30s")
    monkeypatch.setenv("FERRY_KEEP_ME", "1")
    done = await arun(["env"])
    assert "LD_PRELOAD=" not in done.stdout and "FAKETIME=" not in done.stdout
    assert "FERRY_KEEP_ME=1" in done.stdout
