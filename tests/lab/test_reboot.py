"""A host reboots: its agent and every process of that host are killed, and what a reboot
wipes goes — its runc --root, its network namespaces' bind mounts and its overlays (in its
own mount namespace), its cgroups; never /run, which the lab's hosts share. The agent is
started again while the host cannot reach the bus: nothing starts. Once the bus is back,
exactly the containers the placement says run there start again from their files on disk
(upper dir and volume) — one whose restart policy is `no` stays down, one placed on the
other host does not start here though this disk holds files of it, and the other host's
containers never notice."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deploy.chaos_cuts import Cut, counters
from deploy.lab.lab import agent_pid, ensure_agent
from deploy.lab.layout import LabLayout, read_spec
from tests.support.cli import ferry
from tests.support.lab_checks import placements, runc_names, runc_pid
from tests.support.workload import build_rootfs, wait_until_serving

pytestmark = pytest.mark.lab

SWEEP_S = 1.0  # the hosts' watchdog interval here: the boot pass retries the bus at it
CUT_SWEEPS = 60  # sweeps for the booted host to try the bus (its packets dropped)
BACK_SWEEPS = 60  # sweeps for the started-again container to serve once the bus is back
TRIED = 20  # packets to the bus dropped: the host has been trying for a while
# Each start adds one to the count on its volume and a line to a file of its upper dir.
COUNTING = (
    "n=$(cat /data/boots 2>/dev/null || echo 0); echo $((n+1)) > /data/boots;"
    " echo up >> /marks; exec /bin/memapp 7000"
)


def _ns_inode(path: Path) -> int:
    return os.stat(path).st_ino


def host_pids(layout: LabLayout, host: str) -> set[int]:
    """Every process of the simulated host: in its mount namespace (agent, workers, CRIU
    and helpers) or in its cgroups (its containers, which have mount namespaces of their own)."""
    mnt = f"mnt:[{_ns_inode(layout.mntns_path(host))}]"
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "mnt") == mnt:
                pids.add(int(entry.name))
        except OSError:
            continue
    cgroups = Path("/sys/fs/cgroup") / layout.cgroup_parent(host).lstrip("/")
    for procs in cgroups.rglob("cgroup.procs") if cgroups.is_dir() else []:
        pids |= {int(p) for p in procs.read_text().split()}
    return pids


def in_host(layout: LabLayout, host: str, *argv: str) -> None:
    subprocess.run(["nsenter", f"--mount={layout.mntns_path(host)}", "--", *argv], check=False)


def reboot(layout: LabLayout, host: str) -> None:
    """What a power cut and a boot do to the host, short of its disk."""
    deadline = time.monotonic() + 30
    while pids := host_pids(layout, host):
        assert time.monotonic() < deadline, f"{host}'s processes outlived SIGKILL: {pids}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    state = layout.state_dir(host)
    subprocess.run(["rm", "-rf", str(state / "runc")], check=True)
    for rootfs in state.glob("containers/*/bundle/rootfs"):
        in_host(
            layout,
            host,
            "umount",
            "--lazy",
            f"/var/lib/ferry/containers/{rootfs.parts[-3]}/bundle/rootfs",
        )
    for netns in (state / "netns").glob("*"):
        in_host(layout, host, "umount", f"/var/lib/ferry/netns/{netns.name}")
        netns.unlink()
    cgroups = Path("/sys/fs/cgroup") / layout.cgroup_parent(host).lstrip("/")
    for directory in sorted(cgroups.rglob("*/"), key=lambda p: -len(p.parts)):
        if directory.is_dir():
            directory.rmdir()
    assert not (state / "runc").exists() and not list((state / "netns").glob("*"))


def test_a_rebooted_host_starts_again_exactly_what_is_placed_on_it(
    lab2: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, spec = LabLayout(lab2), read_spec(LabLayout(lab2))
    assert spec is not None
    rootfs = build_rootfs(tmp_path / "rootfs")
    run = ["container", "run", "--rootfs", str(rootfs)]
    web = ferry(
        lab2, *run, "--host", "h1", "--name", "web", "--restart", "always",
        "--volume", "webdata:/data", "--", "/bin/sh", "-c", COUNTING,
    )  # fmt: skip
    assert web.code == 0, web.stderr
    web_ip = web.stdout.split()[-1]
    once = ferry(lab2, *run, "--host", "h1", "--name", "once", "--", "/bin/memapp", "7000")
    assert once.code == 0, once.stderr
    far = ferry(
        lab2, *run, "--host", "h2", "--name", "far", "--restart", "always",
        "--", "/bin/memapp", "7000",
    )  # fmt: skip
    assert far.code == 0, far.stderr
    wait_until_serving(web_ip)
    far_pid = runc_pid(lab2, "h2", "far")
    h1 = layout.state_dir("h1")
    # Files of `far` on h1's disk, as a crash during a clean-up would leave them.
    (h1 / "containers" / "far" / "upper").mkdir(parents=True)
    assert (h1 / "volumes" / "webdata" / "data" / "boots").read_text().strip() == "1"

    reboot(layout, "h1")
    assert agent_pid(layout, "h1") is None and runc_names(lab2, "h1") == []
    cut = Cut(
        netns=str(layout.netns_path("h1")),
        nats=tuple((spec.nats_address(n), spec.nats_port) for n in spec.nats_nodes),
    )
    for rule in cut.rules():
        cut.iptables("-I", *rule)
    try:
        monkeypatch.setenv("FERRY_WATCHDOG_INTERVAL_S", str(SWEEP_S))
        ensure_agent(layout, spec, "h1", print)  # the boot: the agent starts, nothing waits
        # The host tries the bus and cannot reach it: its packets are dropped, and it
        # starts nothing from what its own disk and ledger say.
        for _ in range(CUT_SWEEPS):
            if counters(cut) >= TRIED:
                break
            time.sleep(SWEEP_S)
        assert counters(cut) >= TRIED, "the booted host never tried the bus"
        assert agent_pid(layout, "h1") is not None
        assert runc_names(lab2, "h1") == [], "nothing starts while the bus is unreachable"
    finally:
        for rule in cut.rules():
            cut.iptables("-D", *rule, check=False)

    for _ in range(BACK_SWEEPS):
        if "web" in runc_names(lab2, "h1"):
            break
        time.sleep(SWEEP_S)
    served = wait_until_serving(web_ip, timeout=BACK_SWEEPS * SWEEP_S)
    assert served, "web serves again on its address"
    assert runc_names(lab2, "h1") == ["web"], "only what is placed on h1 with a policy to start"
    assert (h1 / "volumes" / "webdata" / "data" / "boots").read_text().strip() == "2"
    assert (h1 / "containers" / "web" / "upper" / "marks").read_text().split() == ["up", "up"]
    assert runc_pid(lab2, "h2", "far") == far_pid, "the other host's containers never noticed"
    # Still placed where they were; `once` is placed on h1 and not running (its policy).
    where = {p["name"]: (p["host"], p["state"]) for p in placements(lab2)}
    assert where == {"web": ("h1", "running"), "once": ("h1", "missing"), "far": ("h2", "running")}
