"""Small, idempotent kernel operations the lab is built from (links, namespaces, mounts)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from services.runtime.proc import run


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", "link", "show", name]
    if netns:
        argv = ["ip", "-n", netns, "link", "show", name]
    return run(argv, check=False).returncode == 0


def links_with_prefix(prefix: str) -> list[str]:
    out = run(["ip", "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out or "[]") if link["ifname"].startswith(prefix)]


def netns_names() -> list[str]:
    out = run(["ip", "-j", "netns", "list"], check=False).stdout
    return [entry["name"] for entry in json.loads(out or "[]")]


def routed_networks() -> list[str]:
    out = run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout
    return [r.get("dst", "") for r in json.loads(out or "[]")]


def is_mountpoint(path: Path) -> bool:
    return run(["mountpoint", "-q", str(path)], check=False).returncode == 0


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points at or below `prefix` in this mount namespace, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = Path(line.split()[4].replace("\\040", " "))
            if target == prefix or prefix in target.parents:
                found.append(target)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def ns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def pids_in_namespaces(inodes: set[int]) -> set[int]:
    """Every process whose network or mount namespace is one of `inodes`."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        for kind in ("net", "mnt"):
            try:
                if os.stat(f"/proc/{entry.name}/ns/{kind}").st_ino in inodes:
                    pids.add(int(entry.name))
                    break
            except OSError:
                break
    pids.discard(os.getpid())
    return pids


def pids_with_cmdline(fragment: str) -> set[int]:
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if fragment.encode() in cmdline:
            pids.add(int(entry.name))
    pids.discard(os.getpid())
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pids: Iterable[int], grace: float = 3.0) -> None:
    """SIGTERM, wait up to `grace`, then SIGKILL whatever is left."""
    pending = {p for p in pids if alive(p)}
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if alive(p)}
        time.sleep(0.05)
    kill(pending)


def kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(name: str) -> list[Path]:
    """Every cgroup directory named `name` at the top of a hierarchy, v1 or v2."""
    dirs = [CGROUP_ROOT / name] if (CGROUP_ROOT / "cgroup.procs").exists() else []
    if CGROUP_ROOT.is_dir():
        dirs += [h / name for h in CGROUP_ROOT.iterdir() if h.is_dir()]
    return [d for d in dirs if d.is_dir()]


def kill_cgroup_tree(top: Path) -> None:
    """Thaw, SIGKILL every process under `top`, then remove the cgroups deepest first."""
    tree = sorted((Path(p) for p, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
    for cg in tree:
        state = cg / "freezer.state"
        if state.exists():
            with contextlib.suppress(OSError):
                state.write_text("THAWED")
    for _ in range(50):
        pids = set()
        for cg in tree:
            try:
                pids |= {int(p) for p in (cg / "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                continue
        if not pids:
            break
        kill(pids)
        time.sleep(0.05)
    for cg in tree:
        with contextlib.suppress(OSError):
            cg.rmdir()
