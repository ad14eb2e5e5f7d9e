"""Liveness instead of clocks, on a real lab: h1's Ferry workers run 30 s behind, h2's 30 s
ahead (libfaketime, the workers only), and the destination's verify step is made slower
(the test fault slow:verify) than a watchdog comparing another host's timestamps with its
own clock would allow — though well within the step's own timeout. Its worker keeps its
lease fresh, so no watchdog abandons it: the move completes with every step on its first
attempt, and runc, CRIU and the container never ran under the fake clock.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects
from schemas.v1.leases import StepLease
from tests.conftest import new_lab_name
from tests.support.bus import operator_nats
from tests.support.cli import Result, ferry
from tests.support.lab_checks import placements, runc_names
from tests.support.workload import query, wait_until_serving
from workflows.stop_and_copy import STOP_AND_COPY

pytestmark = pytest.mark.lab

SLOW_S = 15  # verify's timeout is 30 s: a 60 s skew made it overdue at once, this adds more
OFFSETS = "h1=-30s,h2=+30s"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def worker_pids(lab: str, host: str) -> list[int]:
    hosts = {h["name"]: h for h in ferry(lab, "hosts", "--json", check=True).json()}
    return [int(pid) for pid in hosts[host]["workers"].values() if pid]


def container_pid(lab: str, host: str, name: str) -> int:
    root = f"/var/lib/ferry-lab/{lab}/hosts/{host}/runc"
    out = subprocess.run(
        ["runc", "--root", root, "state", name], capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout)["pid"])


def assert_workers_run_under(lab: str, host: str, offset: str) -> None:
    pids = worker_pids(lab, host)
    assert len(pids) == 4, pids
    for pid in pids:
        env = environ_of(pid)
        assert env.get("FAKETIME") == offset and "faketime" in env.get("LD_PRELOAD", ""), pid


async def migrating_while_watching(lab: str, step: str, *args: str) -> tuple[Result, list[Any]]:
    """`ferry migrate ARGS`, and every lease written for `step` meanwhile."""
    nc = await operator_nats(lab)
    try:
        kv = await nc.jetstream().key_value(subjects.LEASES_BUCKET)
        watcher = await kv.watch(f"*.forward.{step}.*")
        seen: list[Any] = []

        async def collect() -> None:
            async for entry in watcher:
                if entry is None:
                    continue
                value = entry.value
                seen.append(StepLease.model_validate_json(value) if value else entry.operation)

        collecting = asyncio.create_task(collect())
        result = await asyncio.to_thread(ferry, lab, "migrate", *args, timeout=300)
        collecting.cancel()
        await watcher.stop()
        return result, seen
    finally:
        await nc.close()


def test_live_steps_survive_slowness_and_clocks_30s_off(lab_capable: None, rootfs: Path) -> None:
    assert glob.glob("/usr/lib/*/faketime/libfaketime.so.1"), "libfaketime: run `make setup`"
    verify = STOP_AND_COPY.step("verify")
    assert verify.timeout_s > SLOW_S and verify.retry.max_attempts > 1
    lab = new_lab_name()
    env = {
        "FERRY_WORKER_FAKETIME": OFFSETS,
        "FERRY_FAULT_SLOW_S": str(SLOW_S),
        "FERRY_WATCHDOG_INTERVAL_S": "1",
    }
    up = ferry(lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=env)
    assert up.code == 0, up.stderr
    try:
        assert_workers_run_under(lab, "h1", "-30s")
        assert_workers_run_under(lab, "h2", "+30s")
        run = ferry(
            lab, "container", "run", "--host", "h2", "--name", "clocks", "--rootfs",
            str(rootfs), "--", "/bin/memapp", "7000", "16",
        )  # fmt: skip
        assert run.code == 0, run.stderr
        ip = run.stdout.strip().splitlines()[-1]
        before = wait_until_serving(ip)
        # Started by a worker under faketime, the container did not inherit it.
        assert "LD_PRELOAD" not in environ_of(container_pid(lab, "h2", "clocks"))

        moved, leases = asyncio.run(migrating_while_watching(
            lab, "verify", "clocks", "--to", "h1", "--strategy", "stop-and-copy",
            "--inject-fault", "slow:verify", "--json",
        ))  # fmt: skip
        record: dict[str, Any] = moved.json()
        assert record["state"] == "completed" and record["committed"], (record, moved.stderr)
        steps = record["steps"]
        # Nothing was abandoned, retried or compensated.
        assert all(s["kind"] == "forward" for s in steps), steps
        assert [(s["name"], s["attempts"], s["status"]) for s in steps] == [
            (s.name, 1, "done") for s in STOP_AND_COPY.steps
        ], steps
        slow = next(s for s in steps if s["name"] == "verify")
        assert slow["duration_ms"] >= SLOW_S * 1000, slow
        # Its worker kept the lease fresh with its progress, then released it.
        held = [lease for lease in leases if isinstance(lease, StepLease)]
        assert held and all(lease.holder.host == "h1" for lease in held), leases
        assert len(held) >= SLOW_S // 5, leases  # renewed every TTL/3 (5 s) and more
        assert any(lease.progress.message.startswith("slowed by a test fault") for lease in held)
        assert not any(lease.abandoned for lease in held)
        assert leases[-1] == "DEL", leases
        # The skew was real: a step started by h1 (behind) "before" the one h2 started.
        starts = [s["started_at"] for s in steps]
        assert any(b < a - 30 for a, b in itertools.pairwise(starts)), starts

        assert {c["name"]: c["host"] for c in placements(lab)}["clocks"] == "h1"
        assert "clocks" in runc_names(lab, "h1") and "clocks" not in runc_names(lab, "h2")
        assert "LD_PRELOAD" not in environ_of(container_pid(lab, "h1", "clocks"))
        after = query(ip)
        assert after["token"] == before["token"] and after["buffer_ok"] is True
    finally:
        assert ferry(lab, "lab", "down", timeout=180).code == 0
