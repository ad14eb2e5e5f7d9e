"""What a lab test checks on a host after a move, from the outside: runc's list, the host's
state directory, mounts and links, and the placements as the CLI reports them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from services.runtime.netns import host_veth_name
from tests.support.cli import ferry
from tests.support.inventory import host_links, host_mounts


def _runc_root(lab: str, host: str) -> str:
    return f"/var/lib/ferry-lab/{lab}/hosts/{host}/runc"


def runc_names(lab: str, host: str) -> list[str]:
    out = subprocess.run(
        ["runc", "--root", _runc_root(lab, host), "list", "-q"], capture_output=True, text=True
    )
    return out.stdout.split()


def runc_pid(lab: str, host: str, name: str) -> int:
    """The container's init process as runc on `host` knows it (fails if runc does not)."""
    state = subprocess.run(
        ["runc", "--root", _runc_root(lab, host), "state", name],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(json.loads(state.stdout)["pid"])


def assert_nothing_left_on(lab: str, host: str, name: str) -> None:
    state = Path(f"/var/lib/ferry-lab/{lab}/hosts/{host}")
    assert name not in runc_names(lab, host)
    assert not (state / "containers" / name).exists()
    assert not (state / "netns" / name).exists()
    assert not list((state / "migrations").glob("*")), "images left behind"
    assert not [m for m in host_mounts(lab, host) if f"/{name}" in m]
    assert host_veth_name(name) not in host_links(lab, host)


def placements(lab: str) -> list[dict[str, Any]]:
    return list(ferry(lab, "containers", "--json", check=True).json())
