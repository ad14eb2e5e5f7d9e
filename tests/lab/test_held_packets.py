"""Stop-and-copy with a held TCP connection: a request sent during the freeze waits in the
destination's hold and is delivered once the move commits — not dropped, and not earlier.

Two moves of one memapp container, one client connection kept open throughout:
- h1 -> h2, its commit slowed by a test fault (3 s): a request sent while the commit waits
  gets no answer, and the restored socket on h2 receives no byte of it (its own counters,
  read with `ss` in its netns) until the placement names h2; then it is answered, once.
- h2 -> h1, no fault: a request sent as the commit starts is held briefly and delivered.
  The client's kernel never retransmitted it (`tcpi_total_retrans` from `ss -ti` is the
  same before and after the move): it was held, not dropped — a dropped one comes back
  only after the client's retransmission timeout, and counts.
Both sides count: the client gets one answer per request, the server's own request counter
grows by exactly the requests sent, and the destination's holder reports what it held.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.lab.layout import HOST_STATE_MOUNT
from schemas import subjects
from schemas.v2.migrations import MigrationRecord
from tests.conftest import new_lab_name
from tests.support.bus import operator_nats
from tests.support.cli import ferry
from workflows.saga import current

pytestmark = pytest.mark.lab

PORT = 7000
NAME = "held"
SLOW_S = 3.0
FERRY = str(Path(sys.executable).parent / "ferry")
RETRANS = re.compile(r"\bretrans:\d+/(\d+)")
BYTES_RECEIVED = re.compile(r"\bbytes_received:(\d+)")


@pytest.fixture(scope="module")
def lab(lab_capable: None) -> Iterator[str]:
    name = new_lab_name()
    env = {"FERRY_FAULT_SLOW_S": str(SLOW_S)}
    up = ferry(name, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=env)
    assert up.code == 0, up.stderr
    try:
        yield name
    finally:
        assert ferry(name, "lab", "down", timeout=180).code == 0


class Connection:
    """One TCP connection to memapp, kept across both moves; one JSON line per request."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.sock = socket.create_connection((ip, PORT), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lines = self.sock.makefile()
        self.sent = self.answered = 0

    def send(self) -> None:
        self.sock.sendall(b"\n")
        self.sent += 1

    def answered_within(self, seconds: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return bool(readable)

    def answer(self) -> dict[str, Any]:
        reply = dict(json.loads(self.lines.readline()))
        self.answered += 1
        return reply

    def ask(self) -> dict[str, Any]:
        self.send()
        return self.answer()

    def total_retrans(self) -> int:
        """The client kernel's own count, as `ss -ti` shows it (absent: none)."""
        local = self.sock.getsockname()
        out = subprocess.run(
            ["ss", "-tinH", "src", f"{local[0]}:{local[1]}", "dst", f"{self.ip}:{PORT}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert out.strip(), "ss does not show the client's connection"
        found = RETRANS.search(out)
        return int(found[1]) if found else 0


def server_bytes_received(lab: str, host: str) -> int:
    """What the container's own sockets on `host` received, from `ss` in its netns (entered
    through the host's mount namespace, where its netns file is mounted)."""
    netns = HOST_STATE_MOUNT / "netns" / NAME
    out = subprocess.run(
        [
            "nsenter", f"--mount=/run/ferry-lab/{lab}/mnt/{host}", "--",
            "nsenter", f"--net={netns}", "ss", "-tinH", "state", "established",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sum(int(n) for n in BYTES_RECEIVED.findall(out))


async def _watch_until_commit_starts(lab: str, mover: asyncio.subprocess.Process) -> str:
    """The migration's id, once its record says the commit step runs."""
    nc = await operator_nats(lab)
    try:
        kv = await nc.jetstream().key_value(subjects.MIGRATIONS_BUCKET)
        watcher = await kv.watchall()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert mover.returncode is None, "the move ended before its commit"
            try:
                entry = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]
            except TimeoutError:
                continue
            if entry is None or not entry.value:
                continue
            record = MigrationRecord.model_validate_json(entry.value)
            step = current(record)
            if record.container == NAME and step is not None and step.name == "commit":
                return record.id
        raise AssertionError("the commit never started")
    finally:
        await nc.close()


async def _move(lab: str, to: str, fault: str | None, conn: Connection) -> tuple[str, bytes]:
    """Start the move, send one request as its commit starts; the id and ferry's output."""
    mover = await asyncio.create_subprocess_exec(
        FERRY, "migrate", NAME, "--to", to, "--strategy", "stop-and-copy", "--json",
        *(["--inject-fault", fault] if fault else []),
        env=_env(lab), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        migration_id = await _watch_until_commit_starts(lab, mover)
        conn.send()
        out, err = await asyncio.wait_for(mover.communicate(), 180)
    finally:
        if mover.returncode is None:
            mover.kill()
    assert mover.returncode == 0, err.decode()
    return migration_id, out


def _env(lab: str) -> dict[str, str]:
    return {**os.environ, "FERRY_LAB": lab}


def record_of(lab: str, migration_id: str) -> dict[str, Any]:
    return dict(ferry(lab, "status", migration_id, "--json", check=True).json())


def test_a_request_sent_during_the_freeze_waits_for_the_commit_and_is_delivered_once(
    lab: str, rootfs: Path
) -> None:
    started = ferry(
        lab, "container", "run", "--host", "h1", "--name", NAME, "--rootfs", str(rootfs),
        "--", "/bin/memapp", str(PORT), "8",
    )  # fmt: skip
    assert started.code == 0, started.stderr
    ip = started.stdout.strip().splitlines()[-1]
    conn = Connection(ip)
    first = conn.ask()
    token, requests = first["token"], first["requests"]

    # 1. h1 -> h2 with the commit held back: nothing reaches h2's copy before it commits.
    async def watch_the_hold() -> tuple[str, bytes, int, bool]:
        mover = asyncio.create_task(_move(lab, "h2", "slow:commit", conn))
        while conn.sent == conn.answered:  # _move sends as the (slowed) commit starts
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        before = await asyncio.to_thread(server_bytes_received, lab, "h2")
        answered_early = await asyncio.to_thread(conn.answered_within, 1.0)
        after = await asyncio.to_thread(server_bytes_received, lab, "h2")
        assert after == before, f"h2's copy received {after - before} bytes before the commit"
        migration_id, out = await mover
        return migration_id, out, before, answered_early

    migration_id, out, received_held, answered_early = asyncio.run(watch_the_hold())
    assert not answered_early, "answered before the commit"
    assert json.loads(out)["state"] == "completed"
    reply = conn.answer()
    assert reply["token"] == token, "not the same process"
    assert reply["requests"] == requests + 1, "the held request was not received exactly once"
    assert server_bytes_received(lab, "h2") > received_held
    opened = record_of(lab, migration_id)["results"]["open_network"]
    assert opened["held_in"] >= 1 and opened["hold_lost"] == 0, opened
    assert opened["hold_ms"] >= SLOW_S * 1000 * 0.9, opened

    # 2. h2 -> h1, no fault: held briefly, delivered, never retransmitted.
    retrans_before = conn.total_retrans()
    migration_id, out = asyncio.run(_move(lab, "h1", None, conn))
    assert json.loads(out)["state"] == "completed"
    assert conn.answered_within(5.0), "the request sent during the freeze got no answer"
    reply = conn.answer()
    assert reply["token"] == token and reply["requests"] == requests + 2
    assert conn.total_retrans() == retrans_before, "the client had to retransmit: a drop"
    opened = record_of(lab, migration_id)["results"]["open_network"]
    assert opened["held_in"] >= 1 and opened["hold_lost"] == 0, opened
    dumped = record_of(lab, migration_id)["results"]["dump"]
    assert dumped["link_handover_ms"] is not None, "the source never handed its link over"

    # The same connection goes on, and the server counted every request once.
    assert conn.ask()["requests"] == requests + 3
    assert conn.sent == conn.answered == 4
    assert ferry(lab, "container", "rm", NAME).code == 0
