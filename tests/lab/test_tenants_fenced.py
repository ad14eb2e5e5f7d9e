"""Tenants are kept out: no process in a container opens a connection to a NATS node or to
any host's Ferry or CRIU port — tried while two migrations hold their CRIU servers open.

A post-copy migration is slowed in `transfer`, so the source's lazy-pages server (the dump's
page server, `results.dump.lazy_pages`) listens; a stop-and-copy one is slowed in `dump`,
so the destination's page server (`results.prepare_destination.page_server`) listens. Then
a static probe run *inside* a tenant container on each host (runc exec: the container's own
namespaces and capabilities) tries every NATS node's ports and every port each host listens
on, at both its management and datacenter addresses. Every attempt must fail, while the
same attempts from the host itself (the root namespace for NATS) succeed right after — the
ports were really open — and each host's FERRY-TENANTS drop counter grows.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy.lab.lab import host_exec_prefix
from deploy.lab.layout import (
    HOST_STATE_MOUNT,
    NATS_CLIENT_PORT,
    NATS_CLUSTER_PORT,
    NATS_MONITOR_PORT,
    LabLayout,
    LabSpec,
    read_spec,
)
from services.config import HostConfig
from services.runtime.firewall import CHAIN
from tests.conftest import new_lab_name
from tests.support.cli import FERRY, ferry
from tests.support.workload import PORT, build_rootfs

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
PROBE_SOURCE = REPO / "tests" / "workloads" / "probe.c"
# How long the slowed steps hold their servers open; the test needs ~10 s of it, and
# does not wait for the rest (the lab goes down).
SLOW_S = 45
PROBE_TIMEOUT_MS = 1500  # a dropped SYN is a timeout; every target is tried at once
NATS_PORTS = (NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT)
TRANSFER_PORT = HostConfig.model_fields["transfer_port"].default
TENANTS = {"h1": "tenant1", "h2": "tenant2"}  # one bystander tenant per host
MOVED = ("lazy", "copy")  # moved from h1 to h2 by post-copy and stop-and-copy
MOVED_FROM = "h1"
IN_FLIGHT_S = 30.0

Target = tuple[str, int]


@pytest.fixture(scope="module")
def lab(lab_capable: None) -> Iterator[str]:
    """Two hosts that take test faults, their slowed steps lasting SLOW_S."""
    name = new_lab_name()
    env = {"FERRY_FAULT_SLOW_S": str(SLOW_S)}
    try:
        up = ferry(name, "lab", "up", "--hosts", "2", "--allow-faults", timeout=180, env=env)
        assert up.code == 0, up.stderr
        yield name
    finally:
        down = ferry(name, "lab", "down", timeout=180)
        assert down.code == 0, down.stderr


@pytest.fixture(scope="module")
def probe_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe, static like memapp, so it runs in the busybox rootfs and on the host."""
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(
        ["gcc", "-O2", "-static", "-Wall", "-Wextra", "-o", str(out), str(PROBE_SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def tenant_rootfs(tmp_path_factory: pytest.TempPathFactory, probe_bin: Path) -> Path:
    root = build_rootfs(tmp_path_factory.mktemp("tenant-rootfs"))
    (root / "bin" / "probe").write_bytes(probe_bin.read_bytes())
    (root / "bin" / "probe").chmod(0o755)
    return root


@pytest.fixture(scope="module")
def tenants(lab: str, tenant_rootfs: Path) -> dict[str, str]:
    """A bystander tenant running on each host (host -> its name), and on h1 the two
    containers the test moves."""
    (host, name), *rest = [*TENANTS.items(), *((MOVED_FROM, name) for name in MOVED)]
    _run_container(lab, host, name, tenant_rootfs)  # uploads the layer the others reuse
    with ThreadPoolExecutor(len(rest)) as pool:
        list(pool.map(lambda hn: _run_container(lab, hn[0], hn[1], tenant_rootfs), rest))
    return TENANTS


def _spec(lab: str) -> LabSpec:
    spec = read_spec(LabLayout(lab))
    assert spec is not None
    return spec


def _run_container(lab: str, host: str, name: str, rootfs: Path) -> None:
    run = ferry(
        lab, "container", "run", "--host", host, "--name", name, "--rootfs", str(rootfs),
        "--", "/bin/memapp", str(PORT), "4",
    )  # fmt: skip
    assert run.code == 0, run.stderr


def _in_container(lab: str, host: str, name: str, *argv: str) -> list[str]:
    """argv run by runc exec in the container: its namespaces, its capabilities."""
    runc_root = HOST_STATE_MOUNT / "runc"  # the host's runc root, seen from its mount ns
    prefix = host_exec_prefix(LabLayout(lab), host)
    return [*prefix, "runc", "--root", str(runc_root), "exec", name, *argv]


def _on_host(lab: str, host: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net={LabLayout(lab).netns_path(host)}", "--", *argv]


def _probe(argv: list[str], targets: list[Target]) -> dict[Target, str]:
    """Run a probe command line on `targets`; the verdict of each."""
    args = [f"{a}:{p}" for a, p in targets]
    done = subprocess.run(
        [*argv, str(PROBE_TIMEOUT_MS), *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    verdicts = {}
    for line in done.stdout.splitlines():
        where, verdict = line.split()
        address, port = where.rsplit(":", 1)
        verdicts[(address, int(port))] = verdict
    assert set(verdicts) == set(targets), done.stdout
    return verdicts


def _listeners(lab: str, host: str) -> set[Target]:
    """Every TCP socket listening in the host's network namespace: (address, port)."""
    out = subprocess.run(
        _on_host(lab, host, "ss", "-Hltn"), capture_output=True, text=True, check=True
    ).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        address, port = local.rsplit(":", 1)
        found.add((address.strip("[]"), int(port)))
    return found


def _host_targets(spec: LabSpec, host: str, listening: set[Target]) -> list[Target]:
    """The host's addresses on every port it listens on, and always on the transfer port."""
    addresses = (spec.mgmt_address(host), spec.address(host))
    ports = {TRANSFER_PORT} | {p for a, p in listening if not a.startswith("127.")}
    return sorted((a, p) for a in addresses for p in ports)


def _covered(target: Target, listening: set[Target]) -> bool:
    address, port = target
    return (address, port) in listening or ("0.0.0.0", port) in listening


def _control_targets(spec: LabSpec, host: str, listening: set[Target]) -> list[Target]:
    """What the host itself connects to: each listening socket once — a CRIU server takes
    a single connection — and every pair nothing listens on. A wildcard socket is tried at
    the datacenter address, the one tenants share; its management pair is the same socket."""
    return [
        (address, port)
        for address, port in _host_targets(spec, host, listening)
        if (address, port) in listening
        or not _covered((address, port), listening)
        or address == spec.address(host)
    ]


def _drops(lab: str, host: str) -> int:
    """Packets FERRY-TENANTS dropped so far in the host's network namespace."""
    out = subprocess.run(
        _on_host(lab, host, "iptables", "-w", "-L", CHAIN, "-v", "-n", "-x"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if " DROP " in line)


def _slowed_in(record: dict[str, Any], step: str) -> bool:
    running = [s["name"] for s in record["steps"] if s["status"] == "running"]
    return record["state"] == "running" and running == [step]


class Migration:
    """`ferry migrate` in the background, slowed by a test fault: looked at while it runs."""

    def __init__(self, lab: str, name: str, strategy: str, fault: str) -> None:
        self.lab = lab
        argv = [str(FERRY), "migrate", name, "--to", "h2", "--strategy", strategy]
        self.proc = subprocess.Popen(
            [*argv, "--inject-fault", fault],
            env={**os.environ, "FERRY_LAB": lab},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        first = self.proc.stderr.readline()  # "migration ID accepted"
        assert first.startswith("migration ") and "accepted" in first, first
        self.id = first.split()[1]

    def held_in(self, step: str) -> dict[str, Any]:
        """The record (`ferry status ID --json`) once the move is held in its slowed step."""
        deadline = time.monotonic() + IN_FLIGHT_S
        while True:
            record = dict(ferry(self.lab, "status", self.id, "--json", check=True).json())
            if _slowed_in(record, step):
                return record
            assert time.monotonic() < deadline, f"{self.id} not held in {step}: {record}"
            time.sleep(0.2)

    def stop_following(self) -> None:
        """Only the CLI ends; the move runs on until the lab goes down."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _split(address_port: str) -> Target:
    address, port = address_port.rsplit(":", 1)
    return address, int(port)


def test_no_tenant_reaches_nats_ferry_or_criu_ports(
    lab: str, tenants: dict[str, str], probe_bin: Path
) -> None:
    spec = _spec(lab)
    migrations = []
    try:
        # One after the other: a slowed dump would hold the source's worker, and the
        # post-copy dump behind it, for the whole slowdown.
        migrations.append(Migration(lab, "lazy", "post-copy", "slow:transfer"))
        lazy = migrations[-1].held_in("transfer")
        migrations.append(Migration(lab, "copy", "stop-and-copy", "slow:dump"))
        copy = migrations[-1].held_in("dump")
        _check_fenced(lab, spec, probe_bin, lazy, copy)
    finally:
        for migration in migrations:
            migration.stop_following()


def _check_fenced(
    lab: str, spec: LabSpec, probe_bin: Path, lazy: dict[str, Any], copy: dict[str, Any]
) -> None:
    # The record says where the CRIU servers listen, on the hosts' management addresses.
    lazy_server = _split(lazy["results"]["dump"]["lazy_pages"])
    page_server = _split(copy["results"]["prepare_destination"]["page_server"])
    assert lazy_server[0] == spec.mgmt_address("h1")
    assert page_server[0] == spec.mgmt_address("h2")

    listening = {host: _listeners(lab, host) for host in spec.hosts}
    assert _covered(lazy_server, listening["h1"]), listening["h1"]
    assert _covered(page_server, listening["h2"]), listening["h2"]
    # The probe speaks IPv4: a host listening on IPv6 beyond loopback would go untested.
    for host, sockets in listening.items():
        assert all("." in a or a == "::1" for a, _ in sockets), (host, sockets)

    nats = sorted((spec.nats_address(n), p) for n in spec.nats_nodes for p in NATS_PORTS)
    per_host = {h: _host_targets(spec, h, listening[h]) for h in spec.hosts}
    targets = nats + [t for h in spec.hosts for t in per_host[h]]
    assert lazy_server in targets and page_server in targets

    drops_before = {h: _drops(lab, h) for h in spec.hosts}
    with ThreadPoolExecutor(len(TENANTS)) as pool:
        tried = dict(
            zip(
                TENANTS,
                pool.map(
                    lambda ht: _probe(_in_container(lab, ht[0], ht[1], "/bin/probe"), targets),
                    TENANTS.items(),
                ),
                strict=True,
            )
        )
    drops_after = {h: _drops(lab, h) for h in spec.hosts}

    # At once, the same pairs from where they are meant to be reached (these connections
    # use up the CRIU servers, so they come last).
    with ThreadPoolExecutor(1 + len(spec.hosts)) as pool:
        from_root = pool.submit(_probe, [str(probe_bin)], nats)
        from_hosts = {
            h: pool.submit(
                _probe,
                _on_host(lab, h, str(probe_bin)),
                _control_targets(spec, h, listening[h]),
            )
            for h in spec.hosts
        }
        control = from_root.result() | {
            t: v for h in spec.hosts for t, v in from_hosts[h].result().items()
        }

    report = "\n".join(
        f"{a}:{p:<6} control {control.get((a, p), 'same-socket'):<11} "
        + " ".join(f"{host}/{TENANTS[host]} {tried[host][(a, p)]:<8}" for host in TENANTS)
        for a, p in targets
    )
    # No tenant connected to anything. A management address is off the tenants' network:
    # their SYNs go to the datacenter's router (the lab's root namespace), which does not
    # route to the management network — FERRY-TENANTS covers the bridge only.
    opened = [(host, t) for host in TENANTS for t in targets if tried[host][t] == "open"]
    assert not opened, f"tenants reached {opened}\n{report}"
    # A datacenter address is on the tenants' own network: their SYNs reach the host and
    # die in FERRY-TENANTS, unanswered (a host without the fence would refuse or accept).
    for host in TENANTS:
        for other in spec.hosts:
            for target in per_host[other]:
                if target[0] == spec.address(other):
                    assert tried[host][target] == "timeout", f"{host} -> {target}\n{report}"
    # Everything the hosts listen on answered the host; nothing else did.
    for host in spec.hosts:
        for target in _control_targets(spec, host, listening[host]):
            want = "open" if _covered(target, listening[host]) else "refused"
            assert control[target] == want, f"{target} from {host}\n{report}"
    assert all(control[t] == "open" for t in nats), report
    for host in spec.hosts:
        aimed = sum(1 for t in per_host[host] if t[0] == spec.address(host)) * len(TENANTS)
        grew = drops_after[host] - drops_before[host]
        assert grew >= aimed, f"{host}: {CHAIN} dropped {grew} packets, {aimed} SYNs aimed"


def test_a_tenant_cannot_route_itself_onto_the_management_network(
    lab: str, tenants: dict[str, str]
) -> None:
    """The on-link trick (`ip route add MGMT dev eth0`) needs CAP_NET_ADMIN, which a
    container lacks: the tenant cannot even try. Were it to, the host's FERRY-TENANTS would
    still drop the SYN, which arrives over the bridge."""
    spec = _spec(lab)
    added = subprocess.run(
        _in_container(lab, "h1", tenants["h1"], "/bin/ip", "route", "add",
                      spec.mgmt_address("h1"), "dev", "eth0"),
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    assert added.returncode != 0
    assert "Operation not permitted" in added.stderr, added.stderr
