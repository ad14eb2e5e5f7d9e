"""A failed move rolls back to the source: one copy runs, state intact, nothing left over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.lab_checks import assert_nothing_left_on, placements, runc_names
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def fault_lab(lab_capable: None) -> Iterator[str]:
    """Two hosts that accept test-only fault injection."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180)
    assert up.code == 0, up.stderr
    yield name
    assert ferry(name, "lab", "down", timeout=180).code == 0


def test_a_failed_restore_rolls_back_to_the_source_with_memory_intact(
    fault_lab: str, rootfs: Path
) -> None:
    run = ferry(
        fault_lab, "container", "run", "--host", "h1", "--name", "stays", "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000", "16",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    before = wait_until_serving(ip)

    failed = ferry(
        fault_lab, "migrate", "stays", "--to", "h2", "--strategy", "stop-and-copy",
        "--inject-fault", "restore", "--json", timeout=300,
    )  # fmt: skip
    assert failed.code == 1, failed.stderr
    record = failed.json()
    assert "state" in record, (failed.stdout, failed.stderr)
    assert record["state"] == "rolled_back" and not record["committed"]
    steps = [(s["name"], s["kind"], s["status"]) for s in record["steps"]]
    assert steps == [
        ("preflight", "forward", "done"),
        ("prepare_destination", "forward", "compensated"),
        ("presync_files", "forward", "compensated"),
        ("dump", "forward", "compensated"),
        ("transfer", "forward", "done"),
        ("restore", "forward", "compensated"),
        ("stop_destination", "compensation", "done"),
        ("resume_source", "compensation", "done"),
        ("forget_presync", "compensation", "done"),
        ("discard_destination", "compensation", "done"),
    ]
    restore = next(s for s in record["steps"] if s["name"] == "restore")
    assert restore["host"] == "h2" and "restore of stays failed" in restore["error"]

    # The pages had streamed to h2; they came back and the source runs the same process.
    after = query(ip)
    assert after["token"] == before["token"]
    assert after["buffer_ok"] is True
    assert after["requests"] == before["requests"] + 1
    placed = {c["name"]: c for c in placements(fault_lab)}["stays"]
    assert (placed["host"], placed["state"]) == ("h1", "running")
    assert "stays" in runc_names(fault_lab, "h1")
    assert_nothing_left_on(fault_lab, "h2", "stays")
    assert not list(Path(f"/var/lib/ferry-lab/{fault_lab}/hosts/h1/migrations").glob("*"))

    # And the container is free to move again.
    moved = ferry(fault_lab, "migrate", "stays", "--to", "h2", "--json", timeout=300)
    assert moved.code == 0, moved.stderr
    assert query(ip)["token"] == before["token"]


def test_fault_injection_is_refused_unless_the_lab_allows_it(lab2: str) -> None:
    refused = ferry(
        lab2, "migrate", "anything", "--to", "h2", "--inject-fault", "restore", "--json"
    )
    assert refused.code == 2
    assert refused.json()["error"]["field"] == "inject_fault"
    again = ferry(lab2, "lab", "up", "--hosts", "2", "--allow-faults")
    assert again.code == 2 and "--allow-faults" in again.stderr


def test_dry_run_reports_each_hosts_checks_and_changes_nothing(
    fault_lab: str, rootfs: Path
) -> None:
    run = ferry(
        fault_lab, "container", "run", "--host", "h1", "--name", "drill", "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    before = (placements(fault_lab), ferry(fault_lab, "status", "--json", check=True).json())
    report = ferry(fault_lab, "migrate", "drill", "--to", "h2", "--dry-run", "--json")
    assert report.code == 0, report.stderr
    body = report.json()
    assert body["ok"] is True and body["dry_run"] is True
    checks = {(c["host"], c["check"]): c for c in body["checks"]}
    assert checks[("h1", "criu")]["ok"] and checks[("h2", "criu")]["ok"]
    assert checks[("h1", "container running here")]["ok"]
    assert checks[("h2", "disk space")]["ok"]
    forecast = checks[("h1->h2", "freeze forecast")]
    assert forecast["ok"] and "MiB resident memory" in forecast["detail"], forecast
    # A budget no move can meet: the dry run says so; the move itself is refused.
    tight = ferry(
        fault_lab, "migrate", "drill", "--to", "h2", "--downtime-budget", "10", "--dry-run",
        "--json",
    )  # fmt: skip
    assert tight.code == 1, tight.stderr
    tight_checks = {(c["host"], c["check"]): c for c in tight.json()["checks"]}
    assert not tight_checks[("h1->h2", "freeze forecast")]["ok"]
    refused = ferry(
        fault_lab, "migrate", "drill", "--to", "h2", "--downtime-budget", "10", "--json"
    )
    assert refused.code == 2, refused.stderr
    assert refused.json()["error"]["field"] == "downtime_budget_ms"
    assert "downtime budget" in refused.json()["error"]["reason"]
    unknown = ferry(fault_lab, "migrate", "drill", "--to", "h7", "--dry-run", "--json")
    assert unknown.code == 2 and unknown.json()["error"]["field"] == "destination"
    after = (placements(fault_lab), ferry(fault_lab, "status", "--json", check=True).json())
    assert after == before


async def test_cancel_rolls_back_before_the_commit_and_is_refused_after(fault_lab: str) -> None:
    import asyncio
    import json

    from tests.support.bus import CANCEL_SUBJECT, REQUEST_SUBJECT, requester_nats

    here = {c["name"]: c for c in placements(fault_lab)}["drill"]["host"]
    there = "h2" if here == "h1" else "h1"
    # Another system, with the requester identity: it may ask and cancel, nothing else.
    nc = await requester_nats(fault_lab)
    try:
        request = {"schema_version": 1, "container": "drill", "destination": there}
        asked = await nc.request(REQUEST_SUBJECT, json.dumps(request).encode(), timeout=15)
        accepted = json.loads(asked.data)
        cancel = json.loads((await nc.request(
            CANCEL_SUBJECT, json.dumps({"id": accepted["id"]}).encode(),
            timeout=15)).data)  # fmt: skip
    finally:
        await nc.close()
    assert cancel == {"schema_version": 1, "id": accepted["id"], "state": "cancelling"}
    for _ in range(200):
        record = ferry(fault_lab, "status", accepted["id"], "--json", check=True).json()
        if record["state"] != "running" and record["state"] != "compensating":
            break
        await asyncio.sleep(0.1)
    assert record["state"] == "rolled_back", record
    assert record["error"].startswith("cancelled")
    placed = {c["name"]: c for c in placements(fault_lab)}["drill"]
    assert (placed["host"], placed["state"]) == (here, "running")
    assert_nothing_left_on(fault_lab, there, "drill")

    done = ferry(fault_lab, "migrate", "drill", "--to", there, "--json", timeout=300)
    assert done.code == 0, done.stderr
    refused = ferry(fault_lab, "cancel", done.json()["id"], "--json")
    assert refused.code == 2 and refused.json()["error"]["field"] == "id"
    assert ferry(fault_lab, "cancel", "nosuch").code == 2
