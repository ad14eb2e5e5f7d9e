"""OCI runtime bundles for runc: the config.json Ferry gives every container."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
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
    *,
    hostname: str,
    args: Sequence[str],
    env: Sequence[str],
    netns_path: Path,
    cgroups_path: str,
    memory_mib: int | None,
    criu_config: Path | None = None,
) -> dict[str, Any]:
    """The runtime spec: own PID, IPC, UTS and mount namespaces, and the network
    namespace Ferry made (an external netns: CRIU then restores `lo` and `eth0` up)."""
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_mib is not None:
        resources["memory"] = {"limit": memory_mib * 1024 * 1024}
    annotations = {"org.criu.config": str(criu_config)} if criu_config else {}
    return {
        "ociVersion": "1.0.2",
        "annotations": annotations,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [DEFAULT_PATH, *env],
            "cwd": "/",
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            # No rlimits: raising one above the host's needs CAP_SYS_RESOURCE, which root
            # may lack (it does on our CI VMs); the container inherits the host's limits.
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": hostname,
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
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
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
"""
LEAVE_STOPPED = """\
# Post-copy: once its pages are served the source stays stopped, not killed.
leave-stopped
"""


def ensure_criu_config(path: Path, *, leave_stopped: bool = False) -> Path:
    """The CRIU options runc passes on (through the org.criu.config annotation).

    Each container has its own file, so a post-copy dump can ask for `leave-stopped`
    (the source waits stopped instead of being killed: the way back) without touching
    any other container's dumps or restores.
    """
    text = CRIU_RUNC_CONFIG + (LEAVE_STOPPED if leave_stopped else "")
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.rename(path)
    return path


def write_config(bundle: Path, config: dict[str, Any]) -> None:
    """Write config.json atomically so a crash never leaves half a spec behind."""
    tmp = bundle / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    tmp.rename(bundle / "config.json")
