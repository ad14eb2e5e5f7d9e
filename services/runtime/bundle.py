"""OCI runtime bundles for runc: the config.json Ferry gives every container."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from schemas.v1.containers import ContainerSpec
from services.errors import RuntimeFailure
from services.tls import TlsFiles

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CFS_PERIOD_US = 100_000
MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
]
READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


def oci_config(
    spec: ContainerSpec,
    *,
    volume_sources: Mapping[str, Path] | None = None,
    hostname: str,
    netns_path: Path,
    cgroups_path: str,
    criu_config: Path | None = None,
) -> dict[str, Any]:
    """The runtime spec of a container from what it is (its ContainerSpec, from the
    placement) and where it runs (this host's paths): own PID, IPC, UTS and mount
    namespaces, and the network namespace Ferry made (an external netns: CRIU then
    restores `lo` and `eth0` up). The only place a config.json is made; it never has
    `hooks` (runc runs them as root, outside the container). `volume_sources`: where each
    of the spec's volumes lives on this host (bind mounts: runc tells CRIU they are
    external, and maps them to this host's paths on a restore)."""
    sources = volume_sources or {}
    missing = [m.name for m in spec.volumes if m.name not in sources]
    if missing:
        raise RuntimeFailure(f"no host directory for volume(s) {', '.join(missing)}")
    volume_mounts = [
        {
            "destination": m.path,
            "type": "bind",
            "source": str(sources[m.name]),
            "options": ["rbind", "nosuid", "nodev", "ro" if m.readonly else "rw"],
        }
        for m in spec.volumes
    ]
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if spec.memory_mib is not None:
        resources["memory"] = {"limit": spec.memory_mib * 1024 * 1024}
    if spec.cpus is not None:
        resources["cpu"] = {"quota": round(spec.cpus * CFS_PERIOD_US), "period": CFS_PERIOD_US}
    annotations = {"org.criu.config": str(criu_config)} if criu_config else {}
    user = spec.user
    process_user: dict[str, Any] = {"uid": user.uid if user else 0, "gid": user.gid if user else 0}
    if user is not None and user.additional_gids:
        process_user["additionalGids"] = list(user.additional_gids)
    capabilities = list(spec.granted_capabilities)
    # glibc's getenv takes a name's first value: the default PATH only when the spec has none
    has_path = any(entry.startswith("PATH=") for entry in spec.env)
    return {
        "ociVersion": "1.0.2",
        "annotations": annotations,
        "process": {
            "terminal": False,
            "user": process_user,
            "args": list(spec.args),
            "env": [*([] if has_path else [DEFAULT_PATH]), *spec.env],
            "cwd": spec.workdir,
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            # No rlimits: raising one above the host's needs CAP_SYS_RESOURCE, which root
            # may lack (it does on our CI VMs); the container inherits the host's limits.
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.hostname or hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": [
                    "nosuid",
                    "noexec",
                    "nodev",
                    "mode=1777",
                    f"size={spec.shm_mib * 1024}k",
                ],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            *volume_mounts,
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": str(netns_path)},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }


CRIU_RUNC_CONFIG = """\
# Written by Ferry; runc hands it to CRIU for every checkpoint and restore.
# A client's connection still in the listen queue must not fail the whole dump:
# it is dropped, and the client connects again.
skip-in-flight
# Locks the application holds (a database's) are dumped and taken again on restore; without
# this CRIU refuses to dump a task that holds one.
file-locks
"""
SKIP_NETWORK_LOCK = """\
# Ferry locks the network itself: the source's link goes down before CRIU runs (nothing in
# or out, so its kernel acknowledges no byte after the dump), and a restore's netns is held
# (FERRY-HOLD) before its link comes up. CRIU's iptables lock would cost iptables-restore
# runs inside the freeze, on both sides: a restore uses the method its dump recorded.
network-lock skip
"""
LEAVE_STOPPED = """\
# Post-copy: once its pages are served the source stays stopped, not killed.
leave-stopped
"""


def _tls_lines(tls: TlsFiles | None, *, listening: bool) -> str:
    """runc has no TLS flags: CRIU reads them from this file (same words as on its command
    line, services/runtime/cmdlines.py `criu_tls`; a restore ignores them)."""
    if tls is None:
        return ""
    lines = [
        "# Pages go over TLS, with the host's own certificate.",
        "tls",
        f"tls-cacert {tls.ca}",
        f"tls-cert {tls.cert}",
        f"tls-key {tls.key}",
    ]
    if listening:  # post-copy: the source's dump listens; the firewall admits only its peer
        lines.append("tls-no-cn-verify")
    return "\n".join(lines) + "\n"


def ensure_criu_config(
    path: Path,
    *,
    leave_stopped: bool = False,
    tls: TlsFiles | None = None,
    ferry_locks_network: bool = True,
) -> Path:
    """The CRIU options runc passes on (through the org.criu.config annotation).

    Each container has its own file, so a post-copy dump can ask for `leave-stopped`
    (the source waits stopped instead of being killed: the way back) without touching
    any other container's dumps or restores. `ferry_locks_network=False` leaves the lock
    to CRIU (the hand-run baseline of `make bench`, which runs no Ferry around CRIU).
    """
    text = CRIU_RUNC_CONFIG + (LEAVE_STOPPED if leave_stopped else "")
    text += SKIP_NETWORK_LOCK if ferry_locks_network else ""
    text += _tls_lines(tls, listening=leave_stopped)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)
    return path


def volume_names(bundle: Path, volumes_dir: Path) -> list[str]:
    """The volumes a bundle's config.json mounts (bind mounts of `volumes_dir/<name>/data`);
    none when it has no config (not made, or removed)."""
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return []
    names = []
    for mount in config.get("mounts", []) if isinstance(config, dict) else []:
        source = Path(str(mount.get("source", "")))
        if mount.get("type") == "bind" and source.parent.parent == volumes_dir:
            names.append(source.parent.name)
    return names


def write_config(bundle: Path, config: dict[str, Any]) -> None:
    """Write config.json atomically so a crash never leaves half a spec behind."""
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    tmp.rename(bundle / "config.json")


def refuse_hooks(bundle: Path) -> None:
    """Called right before runc runs or restores from `bundle`: a config.json with OCI
    hooks (which runc would run as root on this host) or one that cannot be read is
    refused. oci_config never writes hooks; this is the second line."""
    path = bundle / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{path} cannot be read: {exc}") from exc
    if not isinstance(config, dict):
        raise RuntimeFailure(f"{path} is not a JSON object: refused")
    if "hooks" in config:
        raise RuntimeFailure(
            f"{path} has OCI hooks: refused (runc would run them as root on this host;"
            " a config Ferry made never has any)"
        )
