"""The shipped systemd units pass `systemd-analyze verify` without a single warning.

verify checks that every Exec*= command exists and is executable, and our units name the
install path (/opt/ferry/venv/bin/...), which this machine need not have. So each test
builds a throwaway root and runs `systemd-analyze --root=ROOT verify`, under which systemd
looks everything up inside ROOT:
- ROOT/etc/systemd/system/ holds the shipped unit files, copied byte for byte;
- ROOT/usr/lib/systemd/system/ is this machine's own, for the targets they depend on;
- each command a unit runs is put at its path in ROOT: /opt/ferry/venv/bin/X is the repo
  venv's bin/X (so the venv must really provide it), anything else this machine's own.
The units are verified as shipped, not edited; only where systemd looks is changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import certificates, identities
from services.controller.config import ControllerConfig
from services.identity_files import write_identities

REPO = Path(__file__).parents[2]
UNITS_DIR = REPO / "deploy" / "systemd"
NATS_CONF = REPO / "deploy" / "nats" / "nats.conf"
CONTROLLER_EXAMPLE = UNITS_DIR / "controller.toml.example"
INSTALL_BIN = Path("/opt/ferry/venv/bin")  # deploy/systemd/README.md installs the venv here
VENV_BIN = Path(sys.executable).parent
UNITS = sorted(UNITS_DIR.glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def directives(unit: Path) -> dict[str, list[str]]:
    """`Section.Key` -> every value it is given, in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def commands(unit: Path) -> set[Path]:
    """The programs a unit's Exec*= lines run (without systemd's prefixes like `-` or `+`)."""
    found = set()
    for key, values in directives(unit).items():
        if key.startswith("Service.Exec"):
            found |= {Path(value.lstrip("-@:+!").split()[0]) for value in values}
    return found


def _place(program: Path, root: Path) -> None:
    if program.is_relative_to(INSTALL_BIN):
        source = VENV_BIN / program.relative_to(INSTALL_BIN)
        assert source.exists(), f"the venv has no {source.name}, yet a unit runs {program}"
    else:
        source = program
        assert source.exists(), f"{program} is not on this machine"
    target = root / program.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), target)
    except OSError:  # another filesystem
        shutil.copy2(source.resolve(), target)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A root holding the shipped units, the system's own units and every program they run."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(unit, root / "etc/systemd/system" / unit.name)
        for program in commands(unit):
            if not (root / program.relative_to("/")).exists():
                _place(program, root)
    yield root


def verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, f"--root={root}", "verify", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_every_unit_is_shipped() -> None:
    assert {u.name for u in UNITS} == {
        "ferry-agent.service",
        "ferry-nats.service",
        "ferry-controller.service",
    }


def test_every_shipped_unit_verifies_without_a_warning(root: Path) -> None:
    done = verify(root, *(u.name for u in UNITS))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_check_would_catch_a_typo_or_a_missing_program(root: Path) -> None:
    agent = root / "etc/systemd/system/ferry-agent.service"
    agent.write_text(agent.read_text().replace("KillMode=process", "KillMode=proces"))
    assert "kill mode" in verify(root, "ferry-agent.service").stderr.lower()
    (root / "opt/ferry/venv/bin/nats-server").unlink()
    done = verify(root, "ferry-nats.service")
    assert done.returncode != 0 and "nats-server" in done.stderr
    controller = root / "etc/systemd/system/ferry-controller.service"
    controller.write_text(
        controller.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt")
    )
    assert "protect system" in verify(root, "ferry-controller.service").stderr.lower()


def test_stopping_the_agent_signals_only_the_agent() -> None:
    agent = directives(UNITS_DIR / "ferry-agent.service")
    assert agent["Service.KillMode"] == ["process"]  # never the CRIU daemons, never containers
    assert agent["Service.Restart"] == ["always"]
    assert agent["Service.RestartPreventExitStatus"] == ["2"]  # a bad config: InvalidInput
    assert agent["Service.ExecStart"] == [
        f"{INSTALL_BIN}/ferry agent --config /etc/ferry/agent.toml"
    ]


def test_the_agent_has_no_hardening_that_runc_or_criu_or_containers_would_inherit() -> None:
    agent = directives(UNITS_DIR / "ferry-agent.service")
    breaking = {
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectProc",
        "ProtectKernelTunables", "ProtectControlGroups", "ReadOnlyPaths", "NoNewPrivileges",
        "SystemCallFilter", "RestrictNamespaces", "RestrictAddressFamilies",
        "MemoryDenyWriteExecute", "CapabilityBoundingSet", "OOMScoreAdjust", "User",
    }  # fmt: skip
    set_here = {key.removeprefix("Service.") for key in agent} & breaking
    assert set_here == {"User"} and agent["Service.User"] == ["root"]


def test_nats_leaves_the_cluster_in_lame_duck_mode() -> None:
    nats = directives(UNITS_DIR / "ferry-nats.service")
    assert nats["Service.KillSignal"] == ["SIGUSR2"]
    assert nats["Service.ExecStart"] == [f"{INSTALL_BIN}/nats-server -c /etc/ferry/nats.conf"]
    assert nats["Service.EnvironmentFile"] == ["/etc/ferry/nats.env"]
    assert int(nats["Service.LimitNOFILE"][0]) >= 65536


def test_the_shipped_nats_conf_is_valid_and_its_lame_duck_fits_the_stop_timeout(
    tmp_path: Path,
) -> None:
    """deploy/nats/nats.conf as a node has it: beside what `ferry identities` writes, with
    the variables of nats.env."""
    example = NATS_CONF
    etc = tmp_path / "etc"
    write_identities(etc, [identities.operator(), identities.host("h1")], ["10.9.0.2"])
    shutil.copyfile(example, etc / "nats.conf")
    ca = certificates.ensure_ca(etc)
    node = certificates.issue(ca, etc, "n1", ["127.0.0.1"])
    env = {"FERRY_NATS_NAME": "n1", "FERRY_NATS_HOST": "127.0.0.1",
           "FERRY_NATS_STORE": str(tmp_path / "store"), "FERRY_NATS_TLS_CERT": str(node.cert),
           "FERRY_NATS_TLS_KEY": str(node.key), "FERRY_NATS_TLS_CA": str(ca.cert)}  # fmt: skip
    done = subprocess.run(
        [str(VENV_BIN / "nats-server"), "-c", str(etc / "nats.conf"), "-t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    seconds = {
        key: int(value.strip('"').removesuffix("s"))
        for key, value in (
            line.split("#")[0].replace(":", " ", 1).split()
            for line in example.read_text().splitlines()
            if line.startswith("lame_duck_")
        )
    }
    nats = directives(UNITS_DIR / "ferry-nats.service")
    timeout_s = int(nats["Service.TimeoutStopSec"][0].removesuffix("s"))
    assert seconds["lame_duck_grace_period"] + seconds["lame_duck_duration"] < timeout_s


def test_the_controller_runs_its_config_and_is_not_restarted_after_a_bad_one() -> None:
    controller = directives(UNITS_DIR / "ferry-controller.service")
    assert controller["Service.ExecStart"] == [
        f"{INSTALL_BIN}/ferry controller --config /etc/ferry/controller.toml"
    ]
    assert controller["Service.Restart"] == ["on-failure"]
    assert controller["Service.RestartPreventExitStatus"] == ["2"]  # a bad config: InvalidInput
    assert controller["Unit.StartLimitIntervalSec"] == ["0"]  # never gives up retrying
    assert controller["Service.KillSignal"] == ["SIGTERM"]  # the active one gives its lease up


def test_the_controller_runs_unprivileged_and_locked_down() -> None:
    """A plain client of the bus: none of the agent's reasons to be root applies."""
    controller = directives(UNITS_DIR / "ferry-controller.service")
    assert controller["Service.User"] == ["ferry-controller"]
    assert controller["Service.Group"] == ["ferry-controller"]
    wanted = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes", "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "PrivateUsers": "yes",
    }  # fmt: skip
    assert {k: controller.get(f"Service.{k}") for k in wanted} == {
        k: [v] for k, v in wanted.items()
    }
    assert controller["Service.SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "AF_NETLINK" not in controller["Service.RestrictAddressFamilies"][0]
    assert "Service.ReadWritePaths" not in controller  # it writes no file


def test_the_controller_example_is_what_ferry_controller_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("FERRY_"):
            monkeypatch.delenv(name)
    config = ControllerConfig.load(CONTROLLER_EXAMPLE)
    assert config.name == "c1"
    # Its identity is the one `ferry identities --controller c1` writes.
    assert config.bus.creds == Path("/etc/ferry") / f"{identities.controller('c1').user}.creds"
    assert config.bus.ca == Path("/etc/ferry/ca.pem") and len(config.bus.servers) == 3
