"""The fast subset of `make chaos`: one run of every fault kind, judged from outside."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import new_lab_name

# Minutes long: `make chaos` runs it (pytest -m long) before the full grid; make test
# leaves it out of its 20-minute budget, which the MariaDB move under sysbench now uses.
pytestmark = [pytest.mark.lab, pytest.mark.long]


def test_every_fault_kind_once_nothing_lost_nothing_doubled_nothing_left(
    lab_capable: None, tmp_path: Path
) -> None:
    report = tmp_path / "chaos.json"
    lab = new_lab_name()
    done = subprocess.run(
        [sys.executable, "-m", "deploy.chaos", "--quick", "--lab", lab, "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout)
    outcomes = json.loads(report.read_text())
    kinds = {o["cell"].split(":")[0].split("[")[0].split("/")[-1] for o in outcomes}
    assert any(o["cell"].startswith("post-copy/") for o in outcomes), "post-copy not covered"
    assert kinds == {"kill", "duplicate", "restore-fails", "corrupt", "nats-restart", "net-cut",
                     "disk-full"}, done.stderr[-3000:]  # fmt: skip
    for o in outcomes:
        assert o["fired"], f"{o['cell']}: the fault did not fire ({o['evidence']})"
        assert not o["ran_twice"], f"{o['cell']}: two copies ran at once"
        assert not o["lost"], f"{o['cell']}: the container or its memory was lost"
        assert o["running_now"] == 1, f"{o['cell']}: {o['running_now']} copies run"
        assert not o["leftovers"], f"{o['cell']}: left {o['leftovers']}"
        assert o["state"] in ("completed", "rolled_back"), o
    assert done.returncode == 0, done.stderr[-3000:]
