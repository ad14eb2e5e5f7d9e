"""Fencing end to end: the leftover collector destroys a copy only on positive evidence.

One lab, four scenarios in sequence, each judged in collector sweeps (counted in the cleanup
worker's log), not in minutes: the placement bucket deleted removes nothing; a true orphan
goes; a copy whose named owner is silent is frozen, then thawed when the placement names its
host; more would-be orphans than the limit removes nothing and `ferry hosts` says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from schemas import subjects
from services import topology
from services.kvstores import KvPlacementStore
from services.runtime.netns import mac_for
from tests.conftest import new_lab_name
from tests.support.bus import operator_nats
from tests.support.cli import ferry
from tests.support.lab_checks import runc_names
from tests.support.workload import query, wait_until_serving
from workflows.placement_chain import OPERATOR_AUTHOR

pytestmark = pytest.mark.lab

ENV = {
    "FERRY_COLLECTOR_INTERVAL_S": "1",
    "FERRY_COLLECTOR_MIN_AGE_S": "3",
    "FERRY_COLLECTOR_CONFIRM_S": "2",
    "FERRY_ORPHAN_LIMIT": "1",
    "FERRY_OWNER_ANSWER_TIMEOUT_S": "1",
}
SWEEP = re.compile(rb"collector sweep \d+")
WAITING_FOR_TOPOLOGY = re.compile(rb"WARNING .*waiting: ")
WALL_LIMIT_S = 120.0  # only a backstop: every wait is bounded in sweeps


@pytest.fixture(scope="module")
def lab(lab_capable: None) -> Iterator[str]:
    """Two hosts whose collectors sweep every second and confirm after 2 s."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", timeout=180, env=ENV)
    assert up.code == 0, up.stderr
    try:
        yield name
    finally:
        down = ferry(name, "lab", "down", timeout=180)
        assert down.code == 0, down.stderr


def _log(lab: str, host: str) -> Path:
    return Path(f"/var/lib/ferry-lab/{lab}/hosts/{host}/log/cleanup.log")


class Sweeps:
    """Counts one host's collector sweeps from a point on (restarts included)."""

    def __init__(self, lab: str, host: str) -> None:
        self.path = _log(lab, host)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def _since(self) -> bytes:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read()

    def count(self) -> int:
        return len(SWEEP.findall(self._since()))

    def waits_for_topology(self) -> bool:
        """Whether the worker, restarted, now waits for the bus's topology to come back."""
        return WAITING_FOR_TOPOLOGY.search(self._since()) is not None


def within_sweeps(
    lab: str, host: str, sweeps: int, done: Callable[[], bool], since: Sweeps | None = None
) -> int:
    """Wait until `done()`, at most `sweeps` of `host`'s collector; how many it took,
    counted from now or from `since` (a counter started earlier)."""
    counter = since or Sweeps(lab, host)
    deadline = time.monotonic() + WALL_LIMIT_S
    while True:
        if done():
            return counter.count()
        seen = counter.count()
        assert seen <= sweeps, f"still not done after {seen} sweeps on {host}"
        assert time.monotonic() < deadline, f"only {seen} sweeps on {host} in {WALL_LIMIT_S}s"
        time.sleep(0.3)


def swept_or_waiting(counter: Sweeps, sweeps: int) -> bool:
    return counter.count() >= sweeps or counter.waits_for_topology()


def wait_sweeps(lab: str, host: str, sweeps: int) -> None:
    counter = Sweeps(lab, host)
    within_sweeps(lab, host, sweeps + 1, lambda: counter.count() >= sweeps)


def run(lab: str, host: str, name: str, rootfs: Path) -> str:
    started = ferry(
        lab, "container", "run", "--host", host, "--name", name, "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000", "1",
    )  # fmt: skip
    assert started.code == 0, started.stderr
    ip = started.stdout.strip().splitlines()[-1]
    wait_until_serving(ip)
    return ip


def runc_status(lab: str, host: str, name: str) -> str | None:
    root = f"/var/lib/ferry-lab/{lab}/hosts/{host}/runc"
    out = subprocess.run(["runc", "--root", root, "state", name], capture_output=True, text=True)
    return str(json.loads(out.stdout)["status"]) if out.returncode == 0 else None


async def _with_js(lab: str, work: Callable[[Any], Any]) -> Any:
    nc = await operator_nats(lab)
    try:
        return await work(nc.jetstream())
    finally:
        await nc.close()


def on_bus(lab: str, work: Callable[[Any], Any]) -> Any:
    return asyncio.run(_with_js(lab, work))


async def operator_placements(js: Any) -> KvPlacementStore:
    return KvPlacementStore(await js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR)


def delete_placement(lab: str, name: str) -> None:
    async def work(js: Any) -> None:
        await (await operator_placements(js)).remove(name)

    on_bus(lab, work)


def place_on(lab: str, name: str, host: str, ip: str) -> None:
    """What an operator's repair would write: the placement names `host` and its copy."""

    async def work(js: Any) -> None:
        placements = await operator_placements(js)
        found = await placements.get(name)
        assert found is not None, f"no placement of {name} to repair"
        current, revision = found
        moved = current.model_copy(update={"host": host, "ip": ip, "mac": mac_for(ip)})
        await placements.update(moved, revision)

    on_bus(lab, work)


def recreate_topology(lab: str) -> None:
    """As an operator would after a lost bucket: `ferry bootstrap` where it exists."""
    if "bootstrap" in ferry(lab, "--help").stdout:
        ferry(lab, "bootstrap", check=True)
        return

    async def work(js: Any) -> None:
        await topology.create_topology(js)

    on_bus(lab, work)


def host_row(lab: str, host: str) -> dict[str, Any]:
    rows = ferry(lab, "hosts", "--json", check=True).json()
    return next(r for r in rows if r["name"] == host)


def worker_pid(lab: str, host: str, role: str) -> int:
    pid = host_row(lab, host)["workers"].get(role)
    assert pid, f"{host}'s {role} worker is not beating"
    return int(pid)


def test_the_collector_destroys_only_on_positive_evidence(lab: str, rootfs: Path) -> None:
    # (a) The placement bucket deleted, containers running on both hosts: nothing goes.
    ips = {"a1": run(lab, "h1", "a1", rootfs), "a2": run(lab, "h2", "a2", rootfs)}
    tokens = {name: query(ip)["token"] for name, ip in ips.items()}
    gone = {host: Sweeps(lab, host) for host in ("h1", "h2")}  # both counted from the loss
    on_bus(lab, lambda js: js.delete_key_value(subjects.PLACEMENT_BUCKET))
    for host, counter in gone.items():
        # Sweeps that find the bucket gone, until the worker sees the topology missing twice
        # (5 s apart) and exits to wait for a bootstrap: either way nothing may go.
        within_sweeps(lab, host, 40, partial(swept_or_waiting, counter, 3))
        assert counter.count() >= 1, f"{host}'s collector never swept with the bucket gone"
    recreate_topology(lab)  # empty: every container is unplaced now
    for host in ("h1", "h2"):
        wait_sweeps(lab, host, 5)
    for name, ip in ips.items():
        assert query(ip)["token"] == tokens[name], f"{name} is not the same process"
    assert runc_status(lab, "h1", "a1") == "running" and runc_status(lab, "h2", "a2") == "running"

    # (b) A true orphan: the placement names h2 on two sweeps and h2 runs it -> h1's copy goes.
    run(lab, "h1", "b", rootfs)
    delete_placement(lab, "b")
    # Counted from before h2's placement exists: starting the container there takes sweeps.
    named_h2 = Sweeps(lab, "h1")
    ip_b2 = run(lab, "h2", "b", rootfs)
    took = within_sweeps(lab, "h1", 8, lambda: "b" not in runc_names(lab, "h1"), named_h2)
    assert took >= 2, "removed before two sweeps confirmed it"
    assert query(ip_b2)["token"] and runc_status(lab, "h2", "b") == "running"

    # (c) The named owner is silent: h1's copy is frozen, never removed; thawed when the
    # placement names h1 again.
    ip_c1 = run(lab, "h1", "c", rootfs)
    token_c = query(ip_c1)["token"]
    cleanup_h2 = worker_pid(lab, "h2", "cleanup")
    os.kill(cleanup_h2, signal.SIGSTOP)
    try:
        delete_placement(lab, "c")
        run(lab, "h2", "c", rootfs)
        within_sweeps(lab, "h1", 10, lambda: runc_status(lab, "h1", "c") == "paused")
        wait_sweeps(lab, "h1", 3)
        assert runc_status(lab, "h1", "c") == "paused", "a frozen copy must stay frozen"
        alerts = host_row(lab, "h1").get("alerts", [])
        assert any(a.startswith("cleanup: c: ") and "silent" in a for a in alerts), alerts
        # The operator's repair: h2's copy goes, the placement names h1's copy.
        root = f"/var/lib/ferry-lab/{lab}/hosts/h2/runc"
        subprocess.run(["runc", "--root", root, "delete", "--force", "c"], check=True)
        place_on(lab, "c", "h1", ip_c1)
        within_sweeps(lab, "h1", 5, lambda: runc_status(lab, "h1", "c") == "running")
    finally:
        os.kill(cleanup_h2, signal.SIGCONT)
    assert query(ip_c1)["token"] == token_c, "the thawed copy is the same process"

    # (d) More would-be orphans than the limit (1): a lost store, not orphans. Nothing goes.
    # h1's collector pauses while they are set up, so that it finds both at once.
    for name in ("d1", "d2"):
        run(lab, "h1", name, rootfs)
    cleanup_h1 = worker_pid(lab, "h1", "cleanup")
    os.kill(cleanup_h1, signal.SIGSTOP)
    try:
        for name in ("d1", "d2"):
            delete_placement(lab, name)
            run(lab, "h2", name, rootfs)
    finally:
        os.kill(cleanup_h1, signal.SIGCONT)

    def says_mass_orphaning() -> bool:
        return any("mass orphaning" in a for a in host_row(lab, "h1").get("alerts", []))

    within_sweeps(lab, "h1", 10, says_mass_orphaning)
    wait_sweeps(lab, "h1", 5)
    for name in ("d1", "d2"):
        assert runc_status(lab, "h1", name) == "running", f"h1's {name} was touched"
    assert says_mass_orphaning()
    for name, ip in ips.items():  # and the unplaced ones of (a) still run, after all that
        assert query(ip)["token"] == tokens[name]
