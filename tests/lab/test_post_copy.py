"""Post-copy (lazy pages) end to end, and its way back: real CRIU, runc, nats-server, two hosts.

The pages are not copied before the restore: the destination runs at once and pulls them
from the source, which waits *stopped* (not killed) until the destination has them all.
A restore that fails after the destination's lazy-pages daemon has connected — the case
where plain CRIU kills the source (machine facts F5) — must give the workload back intact.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.lab_checks import assert_nothing_left_on, placements, runc_names
from tests.support.workload import PORT, query, wait_until_serving

pytestmark = pytest.mark.lab

BUFFER_MIB = 48
STEPS = [
    "preflight",
    "prepare_destination",
    "presync_files",
    "dump",
    "transfer",
    "restore",
    "verify",
    "commit",
    "open_network",
    "drain_pages",
    "clean_source",
]


class HeldConnection:
    """One TCP connection to the workload, kept open across moves."""

    def __init__(self, ip: str) -> None:
        self.sock = socket.create_connection((ip, PORT), timeout=30)
        self.lines = self.sock.makefile()

    def ask(self) -> dict[str, Any]:
        self.sock.sendall(b"\n")
        return dict(json.loads(self.lines.readline()))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def lazy_lab(lab_capable: None) -> Iterator[str]:
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180)
    assert up.code == 0, up.stderr
    yield name
    assert ferry(name, "lab", "down", timeout=180).code == 0


def _run(lab: str, name: str, rootfs: Path) -> str:
    run = ferry(
        lab, "container", "run", "--host", "h1", "--name", name, "--rootfs", str(rootfs),
        "--", "/bin/memapp", str(PORT), str(BUFFER_MIB),
    )  # fmt: skip
    assert run.code == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


def test_auto_picks_post_copy_here_and_state_survives_a_round_trip(
    lazy_lab: str, rootfs: Path
) -> None:
    ip = _run(lazy_lab, "lazy", rootfs)
    before = wait_until_serving(ip)
    held = HeldConnection(ip)
    first = held.ask()
    try:
        for destination, source in (("h2", "h1"), ("h1", "h2")):
            moved = ferry(lazy_lab, "migrate", "lazy", "--to", destination, "--json", timeout=300)
            assert moved.code == 0, moved.stderr
            record = moved.json()
            # Live progress on stderr: the strategy and why, then bytes, rate and ETA.
            assert "by post-copy (auto:" in moved.stderr
            assert "MiB/s ETA" in moved.stderr
            # No --strategy: auto chose post-copy, and says why pre-copy was passed over.
            assert record["strategy"]["chosen"] == "post-copy"
            assert "mem_dirty_track" in record["strategy"]["reason"]
            assert [s["name"] for s in record["steps"]] == STEPS
            assert record["state"] == "completed" and record["committed"]
            # The pages really went over the network after the restore: the source's
            # CRIU served at least the buffer.
            assert record["bytes_moved"] >= BUFFER_MIB * 2**20
            after = held.ask()  # the same connection, across the move
            assert after["token"] == before["token"]
            assert after["buffer_ok"] is True, "a page came back wrong or zero-filled"
            assert after["unix_ok"] is True
            assert after["requests"] > first["requests"]
            placed = {c["name"]: c for c in placements(lazy_lab)}["lazy"]
            assert (placed["host"], placed["state"]) == (destination, "running")
            # The stopped source copy went once every page had arrived.
            assert_nothing_left_on(lazy_lab, source, "lazy")
    finally:
        held.close()
    assert query(ip)["token"] == before["token"]


def test_a_restore_failing_during_post_copy_gives_the_source_back_intact(
    lazy_lab: str, rootfs: Path
) -> None:
    ip = _run(lazy_lab, "keeper", rootfs)
    before = wait_until_serving(ip)
    held = HeldConnection(ip)
    asked = held.ask()
    try:
        failed = ferry(
            lazy_lab, "migrate", "keeper", "--to", "h2", "--strategy", "post-copy",
            "--inject-fault", "restore", "--json", timeout=300,
        )  # fmt: skip
        assert failed.code == 1, failed.stderr
        record = failed.json()
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
        assert restore["host"] == "h2" and "restore of keeper failed" in restore["error"]

        # The source was stopped, not killed: the same process, memory and connection.
        after = held.ask()
        assert after["token"] == before["token"]
        assert after["pid"] == asked["pid"]
        assert after["buffer_ok"] is True
        assert after["requests"] == asked["requests"] + 1
    finally:
        held.close()
    placed = {c["name"]: c for c in placements(lazy_lab)}["keeper"]
    assert (placed["host"], placed["state"]) == ("h1", "running")
    assert "keeper" in runc_names(lazy_lab, "h1")
    assert_nothing_left_on(lazy_lab, "h2", "keeper")
    assert not list(Path(f"/var/lib/ferry-lab/{lazy_lab}/hosts/h1/migrations").glob("*"))

    # Free to move again, and this time it goes.
    moved = ferry(lazy_lab, "migrate", "keeper", "--to", "h2", "--json", timeout=300)
    assert moved.code == 0, moved.stderr
    assert query(ip)["token"] == before["token"]


def test_pre_copy_is_refused_here_with_the_reason(lazy_lab: str) -> None:
    refused = ferry(lazy_lab, "migrate", "keeper", "--to", "h1", "--strategy", "pre-copy")
    assert refused.code == 2
    assert "mem_dirty_track" in refused.stderr and "soft-dirty" in refused.stderr


def test_pages_lost_after_the_commit_fall_back_to_the_stopped_source(
    lazy_lab: str, rootfs: Path
) -> None:
    """The destination's lazy-pages daemon dies with most pages still at the source: its
    copy would run on zero-filled memory. Ferry stops it and continues the source's copy."""
    run = ferry(
        lazy_lab, "container", "run", "--host", "h1", "--name", "fallback", "--rootfs",
        str(rootfs), "--", "/bin/memapp", str(PORT), "256",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    before = wait_until_serving(ip, timeout=60)
    held = HeldConnection(ip)
    asked = held.ask()
    try:
        moved = ferry(
            lazy_lab, "migrate", "fallback", "--to", "h2", "--strategy", "post-copy",
            "--inject-fault", "lazy-pages-dies", "--json", timeout=300,
        )  # fmt: skip
        assert moved.code == 1, moved.stderr
        record = moved.json()
        assert record["state"] == "rolled_back" and record["committed"]
        assert "drain_pages failed after the commit" in record["error"]
        assert "fell back to h1" in record["error"]
        tail = [(s["name"], s["kind"], s["status"]) for s in record["steps"]][-6:]
        assert tail == [
            ("open_network", "forward", "done"),
            ("drain_pages", "forward", "compensated"),
            ("stop_destination", "compensation", "done"),
            ("uncommit", "compensation", "done"),
            ("resume_source", "compensation", "done"),
            ("discard_destination", "compensation", "done"),
        ]
        # The source's stopped copy continues: same process, memory, connection.
        after = held.ask()
        assert after["token"] == before["token"] and after["pid"] == asked["pid"]
        assert after["buffer_ok"] is True
        assert after["requests"] == asked["requests"] + 1
    finally:
        held.close()
    placed = {c["name"]: c for c in placements(lazy_lab)}["fallback"]
    assert (placed["host"], placed["state"]) == ("h1", "running")
    assert_nothing_left_on(lazy_lab, "h2", "fallback")
    assert ferry(lazy_lab, "container", "rm", "fallback").code == 0
