"""`make demo`: a stateful server moves h1 -> h2 -> h1 while a client keeps talking to it.

The server keeps a random token, a counter of requests and a buffer of known bytes in
memory only. The client holds one TCP connection and asks it every 10 ms on it; at the end
it prints how many connections it needed (one: nothing was reset), the longest pause it
observed and what each move's record says.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.workloads import PORT, build_rootfs, wait_until_serving

FERRY = str(Path(sys.executable).parent / "ferry")
LAB = os.environ.get("FERRY_LAB", "demo")
NAME = "counter"


def ferry(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FERRY_LAB": LAB}
    return subprocess.run(
        [FERRY, *args], env=env, text=True, check=True,
        stdout=subprocess.PIPE if capture else None,
    )  # fmt: skip


@dataclass
class Client:
    """Holds one TCP connection and asks the server every `interval` seconds on it."""

    ip: str
    interval: float = 0.01
    replies: int = 0
    resets: int = 0
    longest_gap: float = 0.0
    tokens: set[str] = field(default_factory=set)
    local_ports: set[int] = field(default_factory=set)
    last: dict[str, object] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection((self.ip, PORT), timeout=30) as conn:
                    self.local_ports.add(conn.getsockname()[1])
                    self._talk(conn)
            except OSError:
                if not self.stop.is_set():
                    self.resets += 1  # counted, then connect again: the demo goes on
                    time.sleep(0.1)

    def _talk(self, conn: socket.socket) -> None:
        stream = conn.makefile("rwb")
        last_ok = time.monotonic()
        while not self.stop.is_set():
            stream.write(b"\n")
            stream.flush()
            line = stream.readline()
            if not line:
                raise ConnectionResetError("server closed the connection")
            self.last = json.loads(line)
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last_ok)
            last_ok = now
            self.replies += 1
            self.tokens.add(str(self.last["token"]))
            time.sleep(self.interval)

    def line(self) -> str:
        return (
            f"client: token {self.last.get('token')} requests {self.last.get('requests')}"
            f" buffer_ok {self.last.get('buffer_ok')} connections {len(self.local_ports)}"
            f" resets {self.resets}  longest pause so far {self.longest_gap * 1000:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--buffer-mib", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = parser.parse_args()

    print(f"== lab {LAB}: two hosts, a 3-node NATS cluster", flush=True)
    ferry("lab", "up", "--hosts", "2")
    with tempfile.TemporaryDirectory(prefix="ferry-demo-") as tmp:
        rootfs = build_rootfs(Path(tmp) / "rootfs")
        print(f"== {NAME}: a server with {args.buffer_mib} MiB of state in memory, on h1")
        out = ferry(
            "container", "run", "--host", "h1", "--name", NAME, "--rootfs", str(rootfs),
            "--", "/bin/memapp", "7000", str(args.buffer_mib), capture=True,
        )  # fmt: skip
    ip = out.stdout.strip().splitlines()[-1]
    first = wait_until_serving(ip)
    print(f"== {NAME} answers at {ip}: token {first['token']}", flush=True)
    client = Client(ip)
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    time.sleep(1)
    records = []
    try:
        for destination in ("h2", "h1"):
            print(f"\n== moving {NAME} to {destination} while the client talks to it", flush=True)
            print(client.line(), flush=True)
            moved = ferry("migrate", NAME, "--to", destination, "--json", capture=True)
            records.append(json.loads(moved.stdout))
            time.sleep(1)
            print(client.line(), flush=True)
    finally:
        client.stop.set()
        thread.join()
    print("\n== summary")
    for r in records:
        print(
            f"{r['source']} -> {r['destination']}: {r['state']}, frozen {r['freeze_ms']} ms,"
            f" {r['bytes_moved'] / 2**20:.1f} MiB moved"
        )
    same = "the same process" if len(client.tokens) == 1 else "DIFFERENT processes"
    print(
        f"client: {client.replies} replies from {same} (token {first['token']}) on"
        f" {len(client.local_ports)} connection(s), {client.resets} resets,"
        f" buffer_ok {client.last.get('buffer_ok')},"
        f" longest pause {client.longest_gap * 1000:.0f} ms"
    )
    if not args.keep:
        ferry("lab", "down")
    ok = (
        len(client.tokens) == 1
        and client.resets == 0
        and all(r["state"] == "completed" for r in records)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
