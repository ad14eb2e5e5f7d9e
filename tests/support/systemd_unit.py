"""What `systemctl enable --now UNIT` would start, read from a unit file. Pure.

Only the [Service] settings that decide the process's command line, environment, user,
umask and state directory are read; the sandboxing ones (ProtectSystem=, …) are not
applied, which the test that uses this says.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's


@dataclass(frozen=True)
class Unit:
    exec_start: str
    environment: dict[str, str] = field(default_factory=dict)
    environment_files: tuple[str, ...] = ()
    user: str = "root"
    group: str = ""
    umask: int = 0o022
    state_directory: str = ""
    state_directory_mode: int = 0o755


def parse(text: str) -> Unit:
    service: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            service.setdefault(key.strip(), []).append(value.strip())
    env: dict[str, str] = {}
    for value in service.get("Environment", []):
        for pair in shlex.split(value):
            name, _, val = pair.partition("=")
            env[name] = val
    (exec_start,) = service["ExecStart"]
    user = service.get("User", ["root"])[-1]
    return Unit(
        exec_start=exec_start,
        environment=env,
        environment_files=tuple(service.get("EnvironmentFile", [])),
        user=user,
        group=service.get("Group", [""])[-1],
        umask=int(service.get("UMask", ["0022"])[-1], 8),
        state_directory=service.get("StateDirectory", [""])[-1],
        state_directory_mode=int(service.get("StateDirectoryMode", ["0755"])[-1], 8),
    )


def parse_environment_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, `#` comments, optional quotes: what EnvironmentFile= accepts here."""
    env = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = " ".join(shlex.split(value)) if value else ""
    return env
