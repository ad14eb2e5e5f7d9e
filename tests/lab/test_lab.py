"""The lab itself: hosts come up healthy, isolated, supervised, and go away without a trace."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import new_lab_name
from tests.support.cli import ferry
from tests.support.inventory import host_mounts, lab_inventory

pytestmark = pytest.mark.lab


def test_hosts_are_up_with_their_own_addresses_and_roots(lab2: str) -> None:
    hosts = ferry(lab2, "hosts", "--json", check=True).json()
    assert [h["name"] for h in hosts] == ["h1", "h2"]
    assert all(h["health"] == "ok" for h in hosts)
    assert len({h["address"] for h in hosts}) == 2
    assert len({h["runc_root"] for h in hosts}) == 2
    for h in hosts:
        assert h["netns"] == f"{lab2}-{h['name']}"
        assert Path(h["state_dir"]).is_dir()
        assert sorted(h["workers"]) == ["cleanup", "destination", "source", "transfer"]
        ping = subprocess.run(["busybox", "ping", "-c1", "-W2", h["address"]], capture_output=True)
        assert ping.returncode == 0, f"{h['name']} at {h['address']} does not answer"


def test_lab_up_again_is_a_no_op_and_another_size_is_refused(lab2: str) -> None:
    before = ferry(lab2, "hosts", "--json", check=True).json()
    again = ferry(lab2, "lab", "up", "--hosts", "2")
    assert again.code == 0, again.stderr
    assert ferry(lab2, "hosts", "--json", check=True).json() == before  # same worker pids

    bigger = ferry(lab2, "lab", "up", "--hosts", "3")
    assert bigger.code == 2
    assert "--hosts" in bigger.stderr and len(bigger.stderr.strip().splitlines()) == 1
    assert [h["name"] for h in ferry(lab2, "hosts", "--json", check=True).json()] == ["h1", "h2"]


def _ls_on_host(lab: str, host: str, path: str) -> subprocess.CompletedProcess[str]:
    mntns = f"/run/ferry-lab/{lab}/mnt/{host}"
    return subprocess.run(
        ["nsenter", f"--mount={mntns}", "ls", "-A", path], capture_output=True, text=True
    )


def test_each_host_sees_only_its_own_state_dir(lab2: str) -> None:
    for host, other in (("h1", "h2"), ("h2", "h1")):
        (Path(f"/var/lib/ferry-lab/{lab2}/hosts/{host}") / "marker").write_text(host)
        own = _ls_on_host(lab2, host, "/var/lib/ferry")
        assert own.returncode == 0 and "marker" in own.stdout.split()
        # The tree of all labs is an empty tmpfs inside; the other host's dir is unreachable.
        assert _ls_on_host(lab2, host, "/var/lib/ferry-lab").stdout == ""
        hidden = _ls_on_host(lab2, host, f"/var/lib/ferry-lab/{lab2}/hosts/{other}")
        assert hidden.returncode != 0
        assert _ls_on_host(lab2, host, "/run/ferry-lab").stdout == ""
        assert "/var/lib/ferry" in host_mounts(lab2, host)
        (Path(f"/var/lib/ferry-lab/{lab2}/hosts/{host}") / "marker").unlink()


def test_a_killed_worker_is_restarted(lab2: str) -> None:
    h1 = next(h for h in ferry(lab2, "hosts", "--json", check=True).json() if h["name"] == "h1")
    old_pid = h1["workers"]["destination"]
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        h1 = next(h for h in ferry(lab2, "hosts", "--json").json() if h["name"] == "h1")
        new_pid = h1["workers"].get("destination")
        if h1["health"] == "ok" and new_pid and new_pid != old_pid:
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"destination worker {old_pid} was not replaced within 30 s")
    cmdline = Path(f"/proc/{new_pid}/cmdline").read_bytes()
    assert b"services.destination" in cmdline


def test_lab_down_leaves_nothing_even_without_its_records(lab_capable: None, rootfs: Path) -> None:
    lab = new_lab_name()
    assert ferry(lab, "lab", "up", "--hosts", "2", timeout=180).code == 0
    run = ferry(
        lab,
        "container",
        "run",
        "--host",
        "h2",
        "--name",
        "app",
        "--rootfs",
        str(rootfs),
        "--",
        "/bin/memapp",
        "7000",
    )
    assert run.code == 0, run.stderr
    assert not lab_inventory(lab).empty()
    # A session killed mid-way leaves no records to go by: down must find things by name.
    Path(f"/var/lib/ferry-lab/{lab}/lab.json").unlink()
    down = ferry(lab, "lab", "down", timeout=120)
    assert down.code == 0, down.stderr
    left = lab_inventory(lab)
    assert left.empty(), left
    assert ferry(lab, "lab", "down").code == 0  # any number of times
    assert ferry(lab, "containers", "--json", check=True).json() == []
    assert ferry(lab, "hosts", "--json", check=True).json() == []
