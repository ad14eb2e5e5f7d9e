"""`make demo`: a stateful server moves h1 -> h2 -> h1 while a client keeps talking to it.

The server keeps a random token, a counter of requests and a buffer of known bytes in
memory only. The client asks it every 20 ms over TCP and prints what it sees; at the end
it prints the longest pause it observed and what each move's record says.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.workloads import build_rootfs, query, wait_until_serving

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
    """Talks to the server every `interval` seconds and remembers what it saw."""

    ip: str
    interval: float = 0.02
    replies: int = 0
    failures: int = 0
    longest_gap: float = 0.0
    tokens: set[str] = field(default_factory=set)
    last: dict[str, object] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        last_ok = time.monotonic()
        while not self.stop.is_set():
            try:
                self.last = query(self.ip, timeout=1.0)
            except OSError:
                self.failures += 1
            else:
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last_ok)
                last_ok = now
                self.replies += 1
                self.tokens.add(str(self.last["token"]))
            time.sleep(self.interval)

    def line(self) -> str:
        return (
            f"client: token {self.last.get('token')} requests {self.last.get('requests')}"
            f" buffer_ok {self.last.get('buffer_ok')}  longest pause so far"
            f" {self.longest_gap * 1000:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--buffer-mib", type=int, default=32)
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = parser.parse_args()

    print(f"== lab {LAB}: two hosts, one NATS", flush=True)
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
        f"client: {client.replies} replies from {same} (token {first['token']}),"
        f" {client.failures} failed tries, buffer_ok {client.last.get('buffer_ok')},"
        f" longest pause {client.longest_gap * 1000:.0f} ms"
    )
    if not args.keep:
        ferry("lab", "down")
    ok = len(client.tokens) == 1 and all(r["state"] == "completed" for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
