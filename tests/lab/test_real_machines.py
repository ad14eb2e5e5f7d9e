"""The README's "Run on your machines" block, run verbatim on namespaces that play the machines.

No second machine is available here, so an operator's machine, three NATS machines and
three hosts are namespaces built from the lab's network pieces only (bridges, veths, each
host's br0 and mount namespace); none of the lab's identities, NATS nodes, configs or
agents. Each machine has a private mount namespace: what a step writes to /etc, /root or
/var stays in that machine. Every step of the block runs in its machine, as root, under
`bash -euo pipefail`, with its text changed only by `readme_block.Mapping` (the example
networks -> the lab's, /opt/ferry -> this checkout, n1/h1 -> the machine's own name and
address) and these stand-ins for what a real machine has:
- `systemctl enable --now UNIT`: the unit file in deploy/systemd/ started as systemd would
  (systemd_unit.py: ExecStart, Environment/EnvironmentFile, User, UMask, StateDirectory;
  not the sandboxing settings), detached, logging to a file;
- "Hand out": the files copied from the operator's /root/fleet to each machine's working
  directory, as scp would;
- one drop-in: each host's agent gets FERRY_CGROUP_PARENT=/ferry-<lab>/<host>. Real hosts
  each have a cgroup tree of their own; here they share one, and with the default
  /ferry/<name> the source's `runc delete` of a moved container would kill the copy the
  destination restored into the same cgroup.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.lab import lab, natscluster
from deploy.lab.layout import HOST_STATE_MOUNT, LabLayout, LabSpec
from services.identity_files import AUTH_FILE, ROUTES_FILE
from tests.conftest import new_lab_name
from tests.support import machines, readme_block
from tests.support.machines import Machine
from tests.support.readme_block import EXAMPLE_MGMT, Mapping, Role
from tests.support.workload import query, wait_until_serving

pytestmark = pytest.mark.lab

README = machines.REPO / "README.md"
VENV_BIN = Path(sys.executable).parent
HOSTS_UP_TIMEOUT_S = 60.0  # as `ferry lab up` waits for its hosts
STOP_TIMEOUT_S = 5.0
ROLES = ["cleanup", "destination", "source", "transfer"]


@dataclass(frozen=True)
class Fleet:
    layout: LabLayout
    spec: LabSpec
    operator: Machine
    env: dict[str, str]
    outputs: dict[int, str]  # each step's stdout (the operator's for 1, 3 and 5)

    def ferry(self, *args: str) -> str:
        argv = " ".join(f"'{a}'" for a in args)
        return machines.run_shell(self.operator, f"ferry {argv}", self.env)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _example_address(real: str) -> str:
    """The address the block would show for a machine the lab puts at `real`."""
    return EXAMPLE_MGMT + real.rsplit(".", 1)[1]


def _build_network(layout: LabLayout) -> LabSpec:
    """The lab's network pieces, nothing else: bridges, hosts' namespaces, NATS namespaces."""
    with lab.locked(layout):
        spec = lab.plan(layout, 3)
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.lab_file.write_text(spec.to_json())  # so another lab's plan() avoids our subnets
        lab._ensure_bridge(layout, spec)
        lab._ensure_mgmt_bridge(layout, spec)
        HOST_STATE_MOUNT.mkdir(parents=True, exist_ok=True)
        for host in spec.hosts:
            lab._ensure_host_network(layout, spec, host)
            lab._ensure_host_mgmt(layout, spec, host)
            lab._ensure_host_mounts(layout, host)
        for node in spec.nats_nodes:
            natscluster.ensure_node_network(layout, spec, node)
    return spec


def _machines(layout: LabLayout, spec: LabSpec, home: Path) -> dict[str, Machine]:
    """The operator (root network namespace), n1..n3 and h1..h3, each with private files."""
    operator = Machine("operator", home / "operator", layout.mnt_dir / "operator")
    machines.pin_mounts(
        layout.mnt_dir,
        operator,
        machines.bind(operator.home / "root", "/root")
        + machines.bind(operator.home / "etc", "/etc/ferry"),
    )
    found = {"operator": operator}
    for node in spec.nats_nodes:
        name = f"n{node}"
        nats = Machine(name, home / name, layout.mnt_dir / name, layout.netns_path(name))
        # /etc whole (useradd writes passwd, group, shadow), /var/lib for its store.
        machines.pin_mounts(
            layout.mnt_dir,
            nats,
            "".join(machines.overlay(nats.home, d) for d in ("/etc", "/var/lib", "/var/log")),
        )
        found[name] = nats
    for host in spec.hosts:
        found[host] = Machine(
            host, home / host, layout.mntns_path(host), layout.netns_path(host)
        )  # the lab's mount namespace: its state dir at /var/lib/ferry, its etc at /etc/ferry
        found[host].workdir.mkdir(parents=True)
    return found


def _hand_out(step_text: str, operator: Machine, fleet: dict[str, Machine]) -> None:
    """What the block's "Hand out:" line says, done as scp would."""
    said = " ".join(step_text.replace("#", " ").split())
    assert "auth.conf and routes.conf to every NATS machine" in said
    assert "host-hN.creds to host hN only" in said
    assert "nN.pem and nN.key to NATS machine nN only" in said
    assert "hN.pem and hN.key to host hN only, ca.pem to every machine" in said
    issued = operator.home / "root" / "fleet"
    for name, machine in fleet.items():
        own = [issued / f"{name}.pem", issued / f"{name}.key", issued / "ca.pem"]
        if name.startswith("n"):
            machines.copy_out([issued / AUTH_FILE, issued / ROUTES_FILE, *own], machine)
        elif name.startswith("h"):
            machines.copy_out([issued / f"host-{name}.creds", *own], machine)


def _run_block(
    layout: LabLayout,
    spec: LabSpec,
    fleet: dict[str, Machine],
    started: list[subprocess.Popen[bytes]],
) -> dict[int, str]:
    steps = readme_block.steps(readme_block.block(README.read_text()))
    assert [(s.number, s.role) for s in steps] == [
        (1, Role.OPERATOR), (2, Role.NATS), (3, Role.OPERATOR), (4, Role.HOST), (5, Role.OPERATOR),
    ]  # fmt: skip
    mapping = Mapping(
        mgmt_prefix=readme_block.prefix(str(spec.mgmt_subnet)),
        dc_prefix=readme_block.prefix(str(spec.subnet)),
        repo=str(machines.REPO),
        venv_bin=str(VENV_BIN),
    )
    env = machines.root_env(VENV_BIN)
    outputs: dict[int, str] = {}
    for step in steps:
        runs: list[tuple[Machine, str, dict[str, str]]]
        if step.role is Role.OPERATOR:
            runs = [(fleet["operator"], step.text, {})]
        elif step.role is Role.NATS:
            runs = [
                (
                    fleet[f"n{n}"],
                    mapping.for_machine(step, f"n{n}", _example_address(spec.nats_address(n))),
                    {},
                )
                for n in spec.nats_nodes
            ]
        else:
            runs = [
                (
                    fleet[h],
                    mapping.for_machine(step, h, _example_address(spec.mgmt_address(h))),
                    {"FERRY_CGROUP_PARENT": layout.cgroup_parent(h)},
                )
                for h in spec.hosts
            ]
        began = time.monotonic()
        for machine, text, drop_in in runs:
            for command in readme_block.commands(mapping.text(text)):
                if command.unit:
                    started.append(machines.start_unit(machine, command.unit, mapping, drop_in))
                else:
                    out = machines.run_shell(machine, command.shell, env)
                    outputs[step.number] = outputs.get(step.number, "") + out
        _say(f"step {step.number} ({step.role.value}): {time.monotonic() - began:.1f} s")
        if step.number == 1:
            _hand_out(step.text, fleet["operator"], fleet)
    return outputs


def _stop_what_down_missed(started: list[subprocess.Popen[bytes]]) -> list[str]:
    """`lab.down` finds processes by the lab's namespaces; kill and name any it missed."""
    missed = []
    for proc in started:
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            missed.append(" ".join(map(str, proc.args)))  # type: ignore[arg-type]
            proc.kill()
            proc.wait()
    return missed


def _show_logs(home: Path, layout: LabLayout) -> None:
    """The units' and the workers' logs, last lines, for a failure's report."""
    logs = sorted(home.glob("*/*.log")) + sorted(layout.root.glob("hosts/*/log/*.log"))
    for log in logs:
        _say(f"--- {log}")
        _say("\n".join(log.read_text(errors="replace").splitlines()[-15:]))


def _count_handshake_retries(home: Path, layout: LabLayout) -> None:
    """How often bus.connect had to connect again (a line before the handshake's PONG)."""
    logs = [*home.glob("*/*.log"), *layout.root.glob("hosts/*/log/*.log")]
    seen = sum(f.read_text(errors="replace").count("before PONG; connecting") for f in logs)
    _say(f"connections made again after a line before PONG: {seen}")


@pytest.fixture(scope="module")
def fleet(lab_capable: None, request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """The block run through step 5 on seven namespaced machines; all of it gone afterwards."""
    layout = LabLayout(new_lab_name())
    home = Path(tempfile.mkdtemp(prefix=f"ferry-{layout.lab}-"))
    home.chmod(0o755)
    started: list[subprocess.Popen[bytes]] = []
    try:
        spec = _build_network(layout)
        fleet = _machines(layout, spec, home)
        outputs = _run_block(layout, spec, fleet, started)
        failed = request.session.testsfailed
        yield Fleet(layout, spec, fleet["operator"], machines.root_env(VENV_BIN), outputs)
        if request.session.testsfailed > failed:
            _show_logs(home, layout)
    except BaseException:
        _show_logs(home, layout)
        raise
    finally:
        _count_handshake_retries(home, layout)
        lab.down(layout, _say)
        missed = _stop_what_down_missed(started)
        shutil.rmtree(home, ignore_errors=True)
    assert not missed, f"lab.down left these running: {missed}"


def _hosts_up(fleet: Fleet) -> list[dict[str, Any]]:
    """`ferry hosts --json` once h1..h3 are all up with their four workers."""
    deadline = time.monotonic() + HOSTS_UP_TIMEOUT_S
    while True:
        hosts: list[dict[str, Any]] = json.loads(fleet.ferry("hosts", "--json"))
        up = {h["name"] for h in hosts if h["health"] == "ok" and sorted(h["workers"]) == ROLES}
        if up == set(fleet.spec.hosts):
            return hosts
        assert time.monotonic() < deadline, f"not all hosts up: {hosts}"
        time.sleep(1.0)


def test_the_hosts_join_with_their_four_workers(fleet: Fleet) -> None:
    # Step 5's own `ferry hosts`, run as the last agent starts: the hosts registered by then.
    header, *rows = fleet.outputs[5].splitlines()
    assert header.split()[:3] == ["HOST", "ADDRESS", "HEALTH"], fleet.outputs[5]
    listed = {r.split()[0] for r in rows}
    assert "h1" in listed and listed <= set(fleet.spec.hosts), fleet.outputs[5]
    hosts = _hosts_up(fleet)
    assert {h["name"]: h["address"] for h in hosts} == {
        h: fleet.spec.mgmt_address(h) for h in fleet.spec.hosts
    }


def test_a_container_runs_on_h1_and_moves_to_h2(fleet: Fleet, rootfs: Path) -> None:
    _hosts_up(fleet)
    fleet.ferry("image", "build", str(rootfs), "--name", "mover")
    run = fleet.ferry(
        "container", "run", "--host", "h1", "--name", "mover", "--image", "mover",
        "--", "/bin/memapp", "7000", "8",
    )  # fmt: skip
    ip = run.strip().splitlines()[-1]
    before = wait_until_serving(ip)
    record = json.loads(fleet.ferry("migrate", "mover", "--to", "h2", "--json"))
    assert record["state"] == "completed", record
    after = query(ip)
    assert after["token"] == before["token"], "a different process answers"
    assert after["ticks"] >= before["ticks"]
    assert after["buffer_ok"] is True
    containers = json.loads(fleet.ferry("containers", "--json"))
    assert [(c["name"], c["host"]) for c in containers] == [("mover", "h2")]
