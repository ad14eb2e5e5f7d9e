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
HOLDAPP = REPO / "build" / "holdapp"  # holds an io_uring or a file lock (pre-flight's tests)
PORT = 7000


def build_rootfs(target: Path) -> Path:
    """A tiny root filesystem: static busybox, the static memapp and holdapp."""
    if not MEMAPP.exists() or not HOLDAPP.exists():
        subprocess.run(["make", "-C", str(REPO), "workloads"], check=True, capture_output=True)
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (target / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/bin/busybox", target / "bin" / "busybox")
    for tool in ("sh", "ls", "cat", "sleep", "ip", "ps"):
        link = target / "bin" / tool
        if not link.is_symlink():
            link.symlink_to("busybox")
    shutil.copy2(MEMAPP, target / "bin" / "memapp")
    shutil.copy2(HOLDAPP, target / "bin" / "holdapp")
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


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, as ldd resolves them on this machine."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def build_binary_rootfs(target: Path, binaries: list[Path]) -> Path:
    """A root filesystem holding host binaries and the shared libraries they load."""
    build_rootfs(target)
    for binary in binaries:
        for path in [binary, *shared_libraries(binary)]:
            real = path.resolve()
            dest = target / str(path).lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copy2(real, dest)
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    return target


REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_ARGS = [
    str(REDIS_SERVER), "--port", "6379", "--bind", "0.0.0.0", "--protected-mode", "no",
    # Nothing may come back from disk: the state that survives a move is in memory.
    "--appendonly", "no", "--save", "",
]  # fmt: skip


def build_redis_rootfs(target: Path) -> Path:
    """Debian's redis-server with its libraries, plus busybox and memapp."""
    return build_binary_rootfs(target, [REDIS_SERVER])


def query_udp(ip: str, port: int = PORT + 1, timeout: float = 5.0) -> dict[str, Any]:
    """One datagram to the workload's UDP port, and its answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"\n", (ip, port))
        data, _ = s.recvfrom(4096)
        return dict(json.loads(data))
