"""The in-memory workload the tests run in containers, and a client for it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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
        (target / "bin" / tool).symlink_to("busybox")
    shutil.copy2(MEMAPP, target / "bin" / "memapp")
    (target / "etc" / "hostname").write_text("ferry\n")
    return target


def query(ip: str, port: int = PORT, timeout: float = 5.0) -> dict[str, Any]:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(b"\n")
        return json.loads(s.makefile().readline())


def query_from_netns(netns: str, ip: str, port: int = PORT) -> dict[str, Any]:
    """Ask the workload from inside another simulated host's network namespace."""
    code = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),5);"
        "s.sendall(b'\\n');print(s.makefile().readline(),end='')"
    )
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", code, ip, str(port)],
        capture_output=True,
        text=True,
        check=True,
        timeout=15,
    ).stdout
    return json.loads(out)
