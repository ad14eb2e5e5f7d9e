"""Connections survive the move: a real redis client writing on one connection sees no reset."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.workloads import build_redis_rootfs, query, query_udp, wait_until_serving
from tests.support.cli import ferry
from tests.support.redis_client import Writer, connect, start_redis

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def redis_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_redis_rootfs(tmp_path_factory.mktemp("redis-rootfs"))


@pytest.fixture
def redis_on_h1(lab2: str, redis_rootfs: Path) -> Iterator[str]:
    yield start_redis(lab2, redis_rootfs)
    ferry(lab2, "container", "rm", "redis")


def test_a_redis_client_rides_through_h1_h2_h1_without_a_reset(lab2: str, redis_on_h1: str) -> None:
    client = connect(redis_on_h1)
    client_id = client.client_id()
    seen_from_server = client.client_info()["addr"]
    local_port = client.connection._sock.getsockname()[1]  # type: ignore[union-attr]
    writer = Writer(client)
    thread = threading.Thread(target=writer.run)
    thread.start()
    try:
        time.sleep(0.5)
        for destination in ("h2", "h1"):
            moved = ferry(lab2, "migrate", "redis", "--to", destination, "--json", timeout=300)
            assert moved.code == 0, moved.stderr
            assert moved.json()["state"] == "completed"
            time.sleep(0.5)
            assert not writer.errors, f"the client saw {writer.errors[0]!r}"
    finally:
        writer.stop.set()
        thread.join(timeout=90)
    assert not writer.errors, f"the client saw {writer.errors[0]!r}"
    assert writer.written > 100

    # The same connection, end to end: same server-side client, same client port.
    assert client.client_id() == client_id
    assert client.client_info()["addr"] == seen_from_server
    assert client.connection._sock.getsockname()[1] == local_port  # type: ignore[union-attr]
    values = [int(v) for v in client.lrange(writer.key, 0, -1)]
    assert values == list(range(writer.written)), "a write was lost or applied twice"
    print(
        f"\nredis client: {writer.written} writes on one connection across h1->h2->h1,"
        f" 0 resets, longest pause {writer.longest_pause * 1000:.0f} ms"
    )


def test_udp_unix_and_held_tcp_sockets_survive(lab2: str, rootfs: Path) -> None:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "sockets", "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000", "4",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    before = wait_until_serving(ip)
    assert before["unix_ok"] is True
    udp_before = query_udp(ip)
    held = socket.create_connection((ip, 7000), timeout=30)
    held_file = held.makefile("rwb")
    held_file.write(b"\n")
    held_file.flush()
    first_on_held = json.loads(held_file.readline())

    for destination in ("h2", "h1"):
        moved = ferry(lab2, "migrate", "sockets", "--to", destination, "--json", timeout=300)
        assert moved.code == 0, moved.stderr
        # Neighbours were told: a gratuitous ARP for the IPv4 address, an unsolicited
        # neighbour advertisement for the IPv6 link-local address.
        announced = next(line for line in moved.stderr.splitlines() if "announced" in line)
        assert ip in announced and "fe80::" in announced
        link_local = next(w for w in announced.replace(",", " ").split() if w.startswith("fe80::"))
        other = "h1" if destination == "h2" else "h2"
        ping6 = subprocess.run(
            ["nsenter", f"--net=/run/netns/{lab2}-{other}", "busybox", "ping", "-6", "-c1",
             "-W3", f"{link_local}%br0"],
            capture_output=True,
        )  # fmt: skip
        assert ping6.returncode == 0, f"{link_local} unreachable over IPv6 from {other}"

    # The connection opened before the moves answers on the same socket.
    held_file.write(b"\n")
    held_file.flush()
    again_on_held = json.loads(held_file.readline())
    assert again_on_held["token"] == first_on_held["token"]
    assert again_on_held["requests"] > first_on_held["requests"]
    held.close()
    # UDP: same process, its datagram counter continued.
    udp_after = query_udp(ip)
    assert udp_after["token"] == before["token"]
    assert udp_after["udp_requests"] == udp_before["udp_requests"] + 1
    # Unix: the listening socket and the connection to the child process both came back.
    after = query(ip)
    assert after["unix_ok"] is True
    assert after["unix_roundtrips"] > udp_after["unix_roundtrips"] > before["unix_roundtrips"]
    assert ferry(lab2, "container", "rm", "sockets").code == 0
