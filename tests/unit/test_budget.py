"""The per-test budget turns a hang into a failure that shows where every thread waited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HANGING = """
import asyncio, time, pytest

@pytest.mark.budget(1)
def test_sleeps():
    time.sleep(30)

@pytest.mark.budget(1)
async def test_awaits():
    await asyncio.sleep(30)

def test_ends():
    pass
"""


def test_a_hang_fails_at_its_budget_with_every_threads_traceback(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(HANGING)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", str(probe), "-q", "-p", "tests.support.budget",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-o", "asyncio_mode=auto"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    out = ran.stdout + ran.stderr
    assert ran.returncode == 1, out
    assert "2 failed, 1 passed" in out, out
    assert "over its budget of 1 s; every thread" in out
    assert "test_probe.py::test_sleeps ran over its budget of 1 s" in out
    assert "test_probe.py::test_awaits ran over its budget of 1 s" in out
    assert "line 6 in test_sleeps" in out, "the traceback shows where it waited"
