"""An inventory of what a lab left on the machine, taken without Ferry's code or records:
only `ip`, `runc`, /proc and /sys, by the lab's name prefix."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True).stdout
    return json.loads(out or "[]")


@dataclass
class Inventory:
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    processes: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    runc_containers: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not any(vars(self).values())


def lab_inventory(lab: str) -> Inventory:
    inv = Inventory()
    prefix = f"{lab}-"
    inv.netns = [
        str(n["name"]) for n in _ip_json("netns", "list") if str(n["name"]).startswith(prefix)
    ]
    inv.links = [
        str(n["ifname"]) for n in _ip_json("link", "show") if str(n["ifname"]).startswith(prefix)
    ]
    lab_paths = (f"/var/lib/ferry-lab/{lab}", f"/run/ferry-lab/{lab}")
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    inv.mounts = [t for t in targets if any(t == p or t.startswith(p + "/") for p in lab_paths)]
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            cgroups = Path(entry.path, "cgroup").read_text()
        except OSError:
            continue
        if (
            f"FERRY_LAB={lab}".encode() in environ
            or f"/ferry-lab/{lab}/" in cmdline
            or f"/ferry-{lab}/" in cgroups
        ):
            inv.processes.append(f"{entry.name} {cmdline.strip()}")
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        if (hierarchy / f"ferry-{lab}").exists():
            inv.cgroups.append(str(hierarchy / f"ferry-{lab}"))
    for root in Path(f"/var/lib/ferry-lab/{lab}/hosts").glob("*/runc"):
        out = subprocess.run(
            ["runc", "--root", str(root), "list", "-q"], capture_output=True, text=True
        )
        inv.runc_containers += [f"{root}:{name}" for name in out.stdout.split()]
    for d in (Path(f"/var/lib/ferry-lab/{lab}"), Path(f"/run/ferry-lab/{lab}")):
        if d.exists():
            inv.dirs.append(str(d))
    return inv


def host_mounts(lab: str, host: str) -> list[str]:
    """Mount points inside a simulated host's own mount namespace."""
    mntns = f"/run/ferry-lab/{lab}/mnt/{host}"
    out = subprocess.run(
        ["nsenter", f"--mount={mntns}", "cat", "/proc/self/mountinfo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[4] for line in out.splitlines()]


def host_links(lab: str, host: str) -> list[str]:
    return [str(n["ifname"]) for n in _ip_json("-n", f"{lab}-{host}", "link", "show")]
