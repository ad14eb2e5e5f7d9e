"""The small in-memory workload used by the demo and the tests (tests/workloads/memapp.c)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MEMAPP = REPO / "build" / "memapp"
PORT = 7000


def build_rootfs(target: Path) -> Path:
    """A tiny root filesystem: static busybox and the static memapp."""
    if not MEMAPP.exists():
        subprocess.run(["make", "-C", str(REPO), "workloads"], check=True, capture_output=True)
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (target / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", target / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "sleep", "ip", "ps"):
        link = target / "bin" / tool
        if not link.is_symlink():
            link.symlink_to("busybox")
    shutil.copy2(MEMAPP, target / "bin" / "memapp")
    (target / "etc" / "hostname").write_text("ferry\n")
    return target


def query(ip: str, port: int = PORT, timeout: float = 5.0) -> dict[str, Any]:
    """One request on a fresh connection: the workload's token, counters and buffer check."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(b"\n")
        return dict(json.loads(s.makefile().readline()))


def wait_until_serving(ip: str, port: int = PORT, timeout: float = 15.0) -> dict[str, Any]:
    """`container run` returns once the process runs; the app may still be filling its buffer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return query(ip, port, timeout=2.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
