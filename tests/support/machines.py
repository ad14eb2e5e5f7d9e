"""Namespaces that play whole machines: run a shell script on one, start a unit on one.

A machine is a network namespace (or the root one) and a pinned mount namespace of its own
in which its /etc, /root, /var/… are private where the test says so, so what a step writes
there never reaches the real machine's. Commands run as root with a clean, login-like
environment; a unit starts as systemd would start it (systemd_unit.py), detached, its
output in a log file.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deploy.lab import kernel
from tests.support import systemd_unit
from tests.support.readme_block import Mapping, exec_argv
from tests.support.systemd_unit import DEFAULT_PATH

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
STEP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Machine:
    name: str
    home: Path  # the test's per-machine directory (a real path)
    mnt: Path  # the pinned mount namespace
    net: Path | None = None  # the network namespace; None: the root one

    @property
    def workdir(self) -> Path:
        """Where the operator's files are copied to (scp) and the steps run."""
        return self.home / "work"

    def argv(self, *cmd: str, wd: str | None = None) -> list[str]:
        net = [f"--net={self.net}"] if self.net else []
        return [
            "nsenter", *net, f"--mount={self.mnt}", f"--wd={wd or self.workdir}", "--", *cmd,
        ]  # fmt: skip


def root_env(venv_bin: Path) -> dict[str, str]:
    """A root login's environment, Ferry's venv on PATH: nothing of the test's own."""
    return {
        "PATH": f"{venv_bin}:{DEFAULT_PATH}",
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
    }


def pin_mounts(mnt_dir: Path, machine: Machine, script: str) -> None:
    """A persistent mount namespace, private below `mnt_dir`, set up by `script`."""
    mnt_dir.mkdir(parents=True, exist_ok=True)
    if not kernel.is_mountpoint(mnt_dir):
        # A mount namespace can only be pinned on a private mount.
        subprocess.run(["mount", "--bind", str(mnt_dir), str(mnt_dir)], check=True)
        subprocess.run(["mount", "--make-private", str(mnt_dir)], check=True)
    machine.workdir.mkdir(parents=True, exist_ok=True)
    machine.mnt.touch()
    subprocess.run(
        ["unshare", f"--mount={machine.mnt}", "--propagation", "slave", "sh", "-euc", script],
        check=True,
        capture_output=True,
    )


def bind(source: Path, target: str) -> str:
    source.mkdir(parents=True, exist_ok=True)
    return f"mount --bind {source} {target}\n"


def overlay(home: Path, target: str) -> str:
    """`target` writable but private: the real one below, this machine's changes on top."""
    upper, work = home / f"{target.strip('/').replace('/', '-')}.upper", home / "overlay.work"
    upper.mkdir(parents=True, exist_ok=True)
    (work / upper.name).mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={target},upperdir={upper},workdir={work / upper.name}"
    return f"mount -t overlay ferry-machine -o {opts} {target}\n"


def run_shell(machine: Machine, text: str, env: dict[str, str]) -> str:
    """The script under `bash -euo pipefail` on the machine; its stdout, or why it failed."""
    done = subprocess.run(
        machine.argv("bash", "-euo", "pipefail", "-c", text),
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"on {machine.name}, exit {done.returncode}:\n{text}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        )
    return done.stdout


def read_file(machine: Machine, path: str) -> str:
    return subprocess.run(
        machine.argv("cat", path, wd="/"), capture_output=True, text=True, check=True
    ).stdout


def start_unit(
    machine: Machine, name: str, mapping: Mapping, drop_in: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """What `systemctl enable --now NAME` starts: deploy/systemd/NAME.service's ExecStart, its
    Environment= and EnvironmentFile=, User=/Group=, UMask= and StateDirectory=, detached.
    `drop_in`: Environment= lines a drop-in file would add."""
    unit = systemd_unit.parse((UNITS / f"{name}.service").read_text())
    env = {"PATH": DEFAULT_PATH, **unit.environment}
    for env_file in unit.environment_files:
        env |= systemd_unit.parse_environment_file(read_file(machine, env_file))
    env |= drop_in or {}
    group = unit.group or unit.user
    if unit.state_directory:
        state = f"/var/lib/{unit.state_directory}"
        mode = f"{unit.state_directory_mode:o}"
        make = ["install", "-d", "-m", mode, "-o", unit.user, "-g", group, state]
        subprocess.run(machine.argv(*make, wd="/"), check=True, capture_output=True)
    as_user = []
    if unit.user != "root":
        as_user = ["setpriv", f"--reuid={unit.user}", f"--regid={group}", "--init-groups", "--"]
    log = machine.home / f"{name}.log"
    with log.open("ab") as out:
        return subprocess.Popen(
            machine.argv(*as_user, *exec_argv(mapping.text(unit.exec_start)), wd="/"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            umask=unit.umask,
        )


def copy_out(files: list[Path], machine: Machine) -> None:
    """As `scp FILES machine:` would: same bytes and mode, owned by the receiving root."""
    for f in files:
        target = machine.workdir / f.name
        target.write_bytes(f.read_bytes())
        os.chmod(target, f.stat().st_mode & 0o777)
