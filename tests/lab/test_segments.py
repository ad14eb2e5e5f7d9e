"""Moves across network segments ("another zone"): the address stays reachable, the
connection stays up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.lab.layout import LabLayout, read_spec
from deploy.workloads import build_redis_rootfs
from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.inventory import lab_inventory
from tests.support.redis_client import Writer, connect, start_redis


def _redis_ping_from(netns: str, ip: str) -> str:
    """PING the server from inside another host's network namespace."""
    code = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],6379),5);"
        "s.sendall(b'PING\\r\\n');print(s.recv(64).decode().strip())"
    )
    done = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code, ip],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return done.stdout.strip()


pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def zones(lab_capable: None) -> Iterator[str]:
    """Two hosts on two routed segments, joined by a router namespace."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", "--segments", "2", timeout=180)
    assert up.code == 0, up.stderr
    yield name
    assert ferry(name, "lab", "down", timeout=180).code == 0
    left = lab_inventory(name)
    assert left.empty(), left


def test_hosts_sit_on_different_segments(zones: str) -> None:
    hosts = ferry(zones, "hosts", "--json", check=True).json()
    assert [h["segment"] for h in hosts] == [1, 2]
    # Their datacenter (uplink) addresses sit on routed segments; the management network,
    # where `address` (Ferry's own traffic) lives, is one flat network for all of them.
    spec = read_spec(LabLayout(zones))
    assert spec is not None
    first, second = (spec.address(h["name"]) for h in hosts)
    assert first.rsplit(".", 1)[0] != second.rsplit(".", 1)[0], "hosts share a subnet"
    assert [h["address"] for h in hosts] == [spec.mgmt_address(h["name"]) for h in hosts]
    again = ferry(zones, "lab", "up", "--hosts", "2", "--segments", "1")
    assert again.code == 2 and "--segments" in again.stderr


def test_redis_moves_across_segments_with_its_client_connected(zones: str, tmp_path: Path) -> None:
    ip = start_redis(zones, build_redis_rootfs(tmp_path / "rootfs"))
    client = connect(ip)
    client_id = client.client_id()
    writer = Writer(client)
    thread = threading.Thread(target=writer.run)
    thread.start()
    try:
        time.sleep(0.5)
        for destination in ("h2", "h1"):
            moved = ferry(zones, "migrate", "redis", "--to", destination, "--json", timeout=300)
            assert moved.code == 0, moved.stderr
            # Reachable from the other zone's host too, at the same address.
            other = "h1" if destination == "h2" else "h2"
            assert _redis_ping_from(f"{zones}-{other}", ip) == "+PONG"
            time.sleep(0.5)
    finally:
        writer.stop.set()
        thread.join(timeout=90)
    assert not writer.errors, f"the client saw {writer.errors[0]!r}"
    assert client.client_id() == client_id
    values = [int(v) for v in client.lrange(writer.key, 0, -1)]
    assert values == list(range(writer.written))
    print(
        f"\nacross segments: {writer.written} writes, 0 resets,"
        f" longest pause {writer.longest_pause * 1000:.0f} ms"
    )
