"""A destination that dies after the commit: post-copy has committed and the destination is
opening the network when every Ferry process of that host and its container are killed. The
way back waits for it (open_network keeps trying) until an operator declares the host dead;
`ferry recover` then moves the placement back and the source continues its stopped copy:
one copy, on the host the placement names, with its memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import new_lab_name
from tests.support.cli import FERRY, ferry
from tests.support.lab_checks import placements, runc_names
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab


def _status(lab: str) -> list[dict[str, Any]]:
    return list(ferry(lab, "status", "--json", check=True).json())


def _wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_host(lab: str, host: str) -> int:
    """Every process in the host's network namespace (its agent first, so nothing restarts)
    and its containers: the machine is gone. Only processes this test's lab started."""
    row = next(r for r in ferry(lab, "hosts", "--json", check=True).json() if r["name"] == host)
    agent = Path(f"/var/lib/ferry-lab/{lab}/hosts/{host}/run/agent.pid").read_text().strip()
    os.kill(int(agent), signal.SIGKILL)
    net = os.stat(f"/run/netns/{row['netns']}").st_ino
    killed = 1
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == net and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    for name in runc_names(lab, host):
        subprocess.run(["runc", "--root", row["runc_root"], "kill", name, "KILL"], check=False)
    return killed


def test_a_destination_declared_dead_after_the_commit_is_recovered_on_the_source(
    lab_capable: None, rootfs: Path
) -> None:
    lab = new_lab_name()
    env = {"FERRY_FAULT_SLOW_S": "900", "FERRY_WATCHDOG_INTERVAL_S": "1"}
    up = ferry(lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=env)
    assert up.code == 0, up.stderr
    move: subprocess.Popen[str] | None = None
    try:
        run = ferry(
            lab, "container", "run", "--host", "h1", "--name", "dead", "--rootfs",
            str(rootfs), "--", "/bin/memapp", "7000", "16",
        )  # fmt: skip
        assert run.code == 0, run.stderr
        ip = run.stdout.strip().splitlines()[-1]
        before = wait_until_serving(ip)

        move = subprocess.Popen(
            [str(FERRY), "migrate", "dead", "--to", "h2", "--strategy", "post-copy",
             "--inject-fault", "slow:open_network"],
            env={**os.environ, "FERRY_LAB": lab}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip

        def opening() -> dict[str, Any] | None:
            for record in _status(lab):
                running = [s["name"] for s in record["steps"] if s["status"] == "running"]
                if record["committed"] and running == ["open_network"]:
                    return record
            return None

        record = _wait_for("the commit, then open_network", opening, 180)
        migration = record["id"]
        assert _kill_host(lab, "h2") >= 5  # agent, four workers, the lazy-pages daemon...

        refused = ferry(lab, "recover", migration)
        assert refused.code == 2 and "h2 is not declared dead" in refused.stderr

        def declared() -> bool:
            said = ferry(lab, "hosts", "declare-dead", "h2", "--reason", "killed by the test")
            assert said.code == 0 or "still sends heartbeats" in said.stderr, said.stderr
            return said.code == 0

        _wait_for("h2's heartbeat to expire", declared, 60)
        dry = ferry(lab, "recover", migration, "--dry-run", "--json")
        assert dry.code == 0, dry.stderr
        assert dry.json()["possible"] and not dry.json()["applied"]
        recovered = ferry(lab, "recover", migration)
        assert recovered.code == 0, recovered.stderr

        def ended() -> dict[str, Any] | None:
            found = next(r for r in _status(lab) if r["id"] == migration)
            return found if found["state"] not in ("running", "compensating") else None

        final = _wait_for("the fallback to end", ended, 240)
        assert final["state"] == "rolled_back", final
        assert "h2, declared dead by an operator: killed by the test" in final["error"]
        assert "fell back to h1" in final["error"]
        statuses = {(s["name"], s["kind"]): s["status"] for s in final["steps"]}
        assert statuses[("resume_source", "compensation")] == "done"
        assert statuses[("uncommit", "compensation")] == "skipped"
        assert statuses[("discard_destination", "compensation")] == "skipped"

        placed = {c["name"]: c for c in placements(lab)}["dead"]
        assert (placed["host"], placed["state"]) == ("h1", "running")
        assert "dead" in runc_names(lab, "h1")
        after = query(ip)
        assert after["token"] == before["token"] and after["buffer_ok"] is True
        hosts = {r["name"]: r for r in ferry(lab, "hosts", "--json", check=True).json()}
        assert hosts["h2"]["declared_dead"]["reason"] == "killed by the test"
    finally:
        if move is not None:
            move.kill()
            move.wait()
        assert ferry(lab, "lab", "down", timeout=180).code == 0
