"""A failed move rolls back to the source: one copy runs, state intact, nothing left over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import new_lab_name
from tests.lab.test_migration import _assert_nothing_left_on, _placements, _runc_names
from tests.support.cli import ferry
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
        fault_lab, "migrate", "stays", "--to", "h2", "--inject-fault", "restore", "--json",
        timeout=300,
    )  # fmt: skip
    assert failed.code == 1, failed.stderr
    record = failed.json()
    assert record["state"] == "rolled_back" and not record["committed"]
    steps = [(s["name"], s["kind"], s["status"]) for s in record["steps"]]
    assert steps == [
        ("preflight", "forward", "done"),
        ("prepare_destination", "forward", "compensated"),
        ("dump", "forward", "compensated"),
        ("transfer", "forward", "done"),
        ("restore", "forward", "compensated"),
        ("stop_destination", "compensation", "done"),
        ("resume_source", "compensation", "done"),
        ("discard_destination", "compensation", "done"),
    ]
    restore = next(s for s in record["steps"] if s["name"] == "restore")
    assert restore["host"] == "h2" and "restore of stays failed" in restore["error"]

    # The pages had streamed to h2; they came back and the source runs the same process.
    after = query(ip)
    assert after["token"] == before["token"]
    assert after["buffer_ok"] is True
    assert after["requests"] == before["requests"] + 1
    placed = {c["name"]: c for c in _placements(fault_lab)}["stays"]
    assert (placed["host"], placed["state"]) == ("h1", "running")
    assert "stays" in _runc_names(fault_lab, "h1")
    _assert_nothing_left_on(fault_lab, "h2", "stays")
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
