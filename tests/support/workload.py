"""The in-memory workload the tests run in containers, and clients for it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from deploy.workloads import PORT, build_rootfs, query, wait_until_serving

__all__ = ["PORT", "build_rootfs", "query", "query_from_netns", "wait_until_serving"]


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
    return dict(json.loads(out))
