"""A rolling upgrade on a real lab: h2's agent is restarted announcing other Ferry wire
versions (FERRY_WIRE_VERSION, a test override honoured only where faults are allowed). One
agent upgraded within the range (2:1 beside h1's 1..1) keeps moving containers both ways;
one that speaks no version h1 speaks (3:3) is refused by pre-flight, naming both sides'
versions, and the container goes on running on h1 as if nothing was asked."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.lab.lab import agent_pid
from deploy.lab.layout import LabLayout
from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.lab_checks import placements, runc_names
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab

AGENT_STOP_S = 30.0
REANNOUNCED_S = 60.0


def host_row(lab: str, host: str) -> dict[str, Any]:
    rows = ferry(lab, "hosts", "--json", check=True).json()
    return next(row for row in rows if row["name"] == host)


def announced_wire(lab: str, host: str) -> tuple[int, int] | None:
    versions = host_row(lab, host).get("versions")
    return (versions["wire_min"], versions["wire"]) if versions else None


def logs_of(layout: LabLayout, host: str, lines: int = 30) -> dict[str, list[str]]:
    """The last lines of each of the host's logs: what to read when its agent did not come back."""
    logs = sorted((layout.state_dir(host) / "log").glob("*.log"))
    return {log.name: log.read_text(errors="replace").splitlines()[-lines:] for log in logs}


def restart_agent_announcing(lab: str, host: str, wire: str) -> None:
    """Stop `host`'s agent (it stops its workers), then let `ferry lab up` start it again,
    the lab up process's environment carrying FERRY_WIRE_VERSION to the new agent only (the
    other hosts' agents still run and are left alone). Returns once the host is healthy and
    its registration announces `wire`."""
    layout = LabLayout(lab)
    pid = agent_pid(layout, host)
    assert pid is not None, f"{host} has no agent"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + AGENT_STOP_S
    while agent_pid(layout, host) is not None:
        assert time.monotonic() < deadline, f"{host}'s agent did not stop"
        time.sleep(0.2)
    up = ferry(
        lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180,
        env={"FERRY_WIRE_VERSION": wire},
    )  # fmt: skip
    assert up.code == 0, (up.stderr, logs_of(layout, host))
    newest, _, oldest = wire.partition(":")
    wanted = (int(oldest or newest), int(newest))
    deadline = time.monotonic() + REANNOUNCED_S
    while (announced_wire(lab, host), host_row(lab, host)["health"]) != (wanted, "ok"):
        assert time.monotonic() < deadline, (host_row(lab, host), logs_of(layout, host))
        time.sleep(0.5)


def placed_on(lab: str, name: str) -> tuple[str, str]:
    placement = {c["name"]: c for c in placements(lab)}[name]
    return placement["host"], placement["state"]


def test_an_agent_upgraded_in_range_moves_and_one_out_of_range_is_refused(
    lab_capable: None, rootfs: Path
) -> None:
    lab = new_lab_name()
    up = ferry(lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180)
    assert up.code == 0, up.stderr
    try:
        h1 = host_row(lab, "h1")["versions"]
        assert (h1["wire_min"], h1["wire"]) == (1, 1), h1
        assert h1["criu"] not in ("", "unknown") and h1["runc"] not in ("", "unknown"), h1
        run = ferry(
            lab, "container", "run", "--host", "h1", "--name", "roll", "--rootfs", str(rootfs),
            "--", "/bin/memapp", "7000", "16",
        )  # fmt: skip
        assert run.code == 0, run.stderr
        ip = run.stdout.strip().splitlines()[-1]
        before = wait_until_serving(ip)

        # One agent upgraded within the range: h2 speaks 1..2, h1 1..1; wire 1 is shared.
        restart_agent_announcing(lab, "h2", "2:1")
        for source, destination in (("h1", "h2"), ("h2", "h1")):
            moved = ferry(
                lab, "migrate", "roll", "--to", destination, "--strategy", "stop-and-copy",
                "--json", timeout=300,
            )  # fmt: skip
            assert moved.code == 0, moved.stderr
            record = moved.json()
            assert (record["state"], record["source"], record["destination"]) == (
                "completed", source, destination,
            ), record  # fmt: skip
            assert placed_on(lab, "roll") == (destination, "running")
            assert query(ip)["token"] == before["token"], "a different process answers"

        # h2 upgraded past the range: it no longer speaks wire 1, which is all h1 speaks.
        restart_agent_announcing(lab, "h2", "3:3")
        table = ferry(lab, "hosts", check=True).stdout
        assert "3..3" in table and "1..1" in table, table
        migrations_before = ferry(lab, "status", "--json", check=True).json()
        for extra in ((), ("--dry-run",)):
            refused = ferry(lab, "migrate", "roll", "--to", "h2", "--json", *extra, timeout=120)
            assert refused.code == 2, (extra, refused.stdout, refused.stderr)
            error = refused.json()["error"]
            assert error["field"] == "destination", error
            assert "h2 speaks wire 3..3, h1 speaks 1..1: no common version" in error["reason"]
        assert ferry(lab, "status", "--json", check=True).json() == migrations_before
        assert placed_on(lab, "roll") == ("h1", "running")
        assert "roll" in runc_names(lab, "h1") and "roll" not in runc_names(lab, "h2")
        after = query(ip)
        assert after["token"] == before["token"] and after["buffer_ok"] is True
    finally:
        assert ferry(lab, "lab", "down", timeout=180).code == 0
