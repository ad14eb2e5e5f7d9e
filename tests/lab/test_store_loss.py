"""The JetStream store lost and restarted empty, containers running on two hosts: the
workers refuse and say why (they never recreate the store empty), `ferry bootstrap` makes
the topology, `ferry reconcile` shows the placements it would write from the hosts' own
ledgers, `--apply` writes them, and every container still runs, the same process, the
whole time. A migration the loss caught ends by the ledgers: rolled forward when the
destination's says committed, rolled back (the source resumes) when none does. The
collectors are slowed right down: the old collector removes containers
whose placement is absent, which is what this test must not depend on."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.lab import lab as lab_ops
from deploy.lab.layout import LabLayout
from tests.conftest import new_lab_name
from tests.support.cli import FERRY, ferry
from tests.support.lab_checks import placements, runc_names
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab

ENV = {"FERRY_COLLECTOR_INTERVAL_S": "3600", "FERRY_COLLECTOR_MIN_AGE_S": "100000"}
REFUSE_WITHIN_S = 60.0
READY_WITHIN_S = 90.0


@pytest.fixture(scope="module")
def lab(lab_capable: None) -> Iterator[str]:
    """Two hosts; faults allowed, to stop a migration at a chosen step for the loss."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=ENV)
    assert up.code == 0, up.stderr
    try:
        yield name
    finally:
        down = ferry(name, "lab", "down", timeout=180)
        assert down.code == 0, down.stderr


def run(lab: str, host: str, name: str, rootfs: Path) -> str:
    started = ferry(
        lab, "container", "run", "--host", host, "--name", name, "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000", "1",
    )  # fmt: skip
    assert started.code == 0, started.stderr
    ip = started.stdout.strip().splitlines()[-1]
    wait_until_serving(ip)
    return ip


def until(done: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"not within {within:.0f}s: {what}"
        time.sleep(0.5)


class Logs:
    """What the hosts' worker logs said since now."""

    def __init__(self, lab: str, hosts: tuple[str, ...], role: str) -> None:
        root = Path(f"/var/lib/ferry-lab/{lab}/hosts")
        self.paths = [root / h / "log" / f"{role}.log" for h in hosts]
        self.offsets = [p.stat().st_size for p in self.paths]

    def each_says(self, text: str) -> bool:
        said = []
        for path, offset in zip(self.paths, self.offsets, strict=True):
            with path.open("rb") as f:
                f.seek(offset)
                said.append(text.encode() in f.read())
        return all(said)


# A new store has no consumers either: the operator names the hosts, as on a real fleet.
EVERY_HOST = ("--host", "h1", "--host", "h2")


def lose_the_store(lab: str) -> None:
    """Lose the store, see every worker refuse, bootstrap, and wait for the hosts."""
    logs = Logs(lab, ("h1", "h2"), "source")
    lab_ops.restart_nats(LabLayout(lab), print, lose_store=True)
    until(lambda: logs.each_says("waiting: the bus lacks"), REFUSE_WITHIN_S, "workers say why")
    ferry(lab, "bootstrap", *EVERY_HOST, check=True)
    until(lambda: healthy(lab), READY_WITHIN_S, "hosts healthy after the bootstrap")


def healthy(lab: str) -> bool:
    rows: list[dict[str, Any]] = ferry(lab, "hosts", "--json", check=True).json()
    return len(rows) == 2 and all(r["health"] == "ok" for r in rows)


def test_a_lost_store_is_rebuilt_from_the_hosts_ledgers(lab: str, rootfs: Path) -> None:
    ips = {"a1": run(lab, "h1", "a1", rootfs), "a2": run(lab, "h2", "a2", rootfs)}
    tokens = {name: query(ip)["token"] for name, ip in ips.items()}

    logs = Logs(lab, ("h1", "h2"), "source")
    lab_ops.restart_nats(LabLayout(lab), print, lose_store=True)

    # The workers refuse, say why, and create nothing.
    until(lambda: logs.each_says("waiting: the bus lacks"), REFUSE_WITHIN_S, "workers say why")
    assert logs.each_says("ferry bootstrap")
    refused = ferry(lab, "reconcile")
    assert refused.code == 1 and "ferry bootstrap" in refused.stderr, refused.stderr
    assert not healthy(lab)
    for name, ip in ips.items():
        assert query(ip)["token"] == tokens[name], f"{name} restarted or moved"

    made = ferry(lab, "bootstrap", *EVERY_HOST, "--json", check=True).json()
    assert "bucket ferry-placement" in made["created"], made
    assert "consumer cmd-h1-source" in made["created"], made
    until(lambda: healthy(lab), READY_WITHIN_S, "hosts healthy after the bootstrap")
    assert placements(lab) == [], "an empty store: no placement yet"

    shown = ferry(lab, "reconcile", "--json", check=True).json()
    assert shown["blocked"] is None and shown["applied"] is None
    assert shown["answered"] == ["h1", "h2"]
    planned = {(p["name"], p["host"], p["ip"], p["action"]) for p in shown["placements"]}
    assert planned == {("a1", "h1", ips["a1"], "create"), ("a2", "h2", ips["a2"], "create")}
    assert shown["conflicts"] == []
    assert placements(lab) == [], "without --apply nothing is written"

    applied = ferry(lab, "reconcile", "--apply", "--json", check=True).json()["applied"]
    assert applied["refused"] == [] and len(applied["written"]) == 2, applied
    assert {(p["name"], p["host"], p["ip"]) for p in placements(lab)} == {
        ("a1", "h1", ips["a1"]),
        ("a2", "h2", ips["a2"]),
    }
    again = ferry(lab, "reconcile", "--apply", "--json", check=True).json()
    assert {p["action"] for p in again["placements"]} == {"exists"}
    assert again["applied"] == {"written": [], "refused": []}

    for name, ip in ips.items():
        assert query(ip)["token"] == tokens[name], f"{name} restarted or moved"
    # The rebuilt state is usable: the container is removed through it, address and all.
    ferry(lab, "container", "rm", "a1", check=True)
    assert [p["name"] for p in placements(lab)] == ["a2"]


def caught_at(lab: str, name: str, fault: str) -> subprocess.Popen[bytes]:
    """Start moving `name` to h2 with `fault` (a worker killed at a step: its command comes
    back only after JetStream's backoff) and return once the fault fired: the migration
    stands still at that step, which is where the store is lost."""
    log = Logs(lab, ("h2",), "destination")
    move = subprocess.Popen(
        [str(FERRY), "migrate", name, "--to", "h2", "--strategy", "stop-and-copy",
         "--inject-fault", fault],
        env={**os.environ, "FERRY_LAB": lab}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    until(lambda: log.each_says(f"chaos: {fault} fires"), 120, f"{fault} fired")
    return move


def end_by_reconcile(lab: str, name: str, action: str) -> str:
    """Reconcile shows how `name`'s migration ends, applies it; the migration's end state."""
    shown = ferry(lab, "reconcile", "--json", check=True).json()
    [caught] = [m for m in shown["migrations"] if m["container"] == name and m["action"] != "ended"]
    assert caught["action"] == action, shown
    applied = ferry(lab, "reconcile", "--apply", "--json", check=True).json()["applied"]
    assert applied["refused"] == [], applied

    def ended() -> bool:
        status = ferry(lab, "status", caught["id"], "--json")
        return status.code == 0 and status.json()["state"] in ("completed", "rolled_back", "failed")

    until(ended, 120, f"migration of {name} ended")
    return str(ferry(lab, "status", caught["id"], "--json", check=True).json()["state"])


def test_migrations_caught_by_the_loss_end_by_the_ledgers(lab: str, rootfs: Path) -> None:
    # Committed (the destination's ledger says so), network not opened yet: roll forward.
    ip = run(lab, "h1", "fwd", rootfs)
    token = query(ip)["token"]
    move = caught_at(lab, "fwd", "kill:open_network:before")
    try:
        lose_the_store(lab)
        assert end_by_reconcile(lab, "fwd", "roll_forward") == "completed"
    finally:
        move.kill()
        move.wait()
    assert "fwd" in runc_names(lab, "h2") and "fwd" not in runc_names(lab, "h1")
    assert query(ip)["token"] == token
    assert [p["host"] for p in placements(lab) if p["name"] == "fwd"] == ["h2"]

    # Not committed (dumped, restore not begun): the source resumes, the destination goes.
    ip = run(lab, "h1", "back", rootfs)
    token = query(ip)["token"]
    move = caught_at(lab, "back", "kill:restore:before")
    try:
        lose_the_store(lab)
        assert end_by_reconcile(lab, "back", "roll_back") == "rolled_back"
    finally:
        move.kill()
        move.wait()
    assert "back" in runc_names(lab, "h1") and "back" not in runc_names(lab, "h2")
    assert query(ip)["token"] == token
    assert [p["host"] for p in placements(lab) if p["name"] == "back"] == ["h1"]
