"""A commit the record never saw: the destination's worker moves the placement, then goes
silent (as if cut off from the bus) for longer than the commit's timeout and grace. The
watchdog gives up on the commit and the saga turns to compensation — but the placement
names the destination, so it must roll forward: exactly one copy at the end, on the host
the placement names, with its memory intact.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.lab_checks import placements, runc_names
from tests.support.workload import query, wait_until_serving

pytestmark = [pytest.mark.lab, pytest.mark.long]  # ~3 min: in `make chaos`

SILENT_S = "150"  # past the commit's three attempts, judged at timeout + grace each


def test_a_commit_unseen_by_the_record_rolls_forward_with_one_copy(
    lab_capable: None, rootfs: Path
) -> None:
    lab = new_lab_name()
    env = {"FERRY_FAULT_SILENT_S": SILENT_S, "FERRY_WATCHDOG_INTERVAL_S": "1"}
    up = ferry(lab, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=env)
    assert up.code == 0, up.stderr
    try:
        run = ferry(
            lab, "container", "run", "--host", "h1", "--name", "unseen", "--rootfs",
            str(rootfs), "--", "/bin/memapp", "7000", "16",
        )  # fmt: skip
        assert run.code == 0, run.stderr
        ip = run.stdout.strip().splitlines()[-1]
        before = wait_until_serving(ip)

        moved = ferry(
            lab, "migrate", "unseen", "--to", "h2", "--strategy", "stop-and-copy",
            "--inject-fault", "silent:commit:after", "--json", timeout=600,
        )  # fmt: skip
        record = moved.json()
        assert record["state"] == "completed" and record["committed"], (record, moved.stderr)
        statuses = {(s["name"], s["kind"]): s["status"] for s in record["steps"]}
        # It rolled forward from the compensation it was about to run, not by a commit retry.
        assert statuses[("commit", "forward")] == "done"
        assert statuses[("stop_destination", "compensation")] == "skipped", statuses
        assert ("resume_source", "compensation") not in statuses
        assert statuses[("open_network", "forward")] == "done"
        assert statuses[("clean_source", "forward")] == "done"

        placed = {c["name"]: c for c in placements(lab)}["unseen"]
        assert (placed["host"], placed["state"]) == ("h2", "running")
        assert "unseen" in runc_names(lab, "h2") and "unseen" not in runc_names(lab, "h1")
        after = query(ip)
        assert after["token"] == before["token"] and after["buffer_ok"] is True
    finally:
        assert ferry(lab, "lab", "down", timeout=180).code == 0
