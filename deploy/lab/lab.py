"""Bringing a lab up and tearing it down, idempotently.

`up` ensures each piece exists (bridge, NATS, host namespaces, agents) and skips what
is already there, so running it again is a no-op and a half-built lab heals. `down`
finds everything by the lab's name prefix, not by its records, so it also clears a lab
whose creator was killed halfway. `up` also writes the lab's bus context for `ferry`, and
`down` removes it (deploy/lab/contexts.py says where and when).

Every lab runs fleet controllers (c1, c2 by default) in the root namespace, as on machines
of their own on the management network: `ferry container run` and every migration ask the
active one, so `up` waits until one holds the controller lease, and `down` stops them
before NATS goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from nats.aio.client import Client as NATS

from deploy.lab import contexts, kernel, natscluster
from deploy.lab import segments as segments_net
from deploy.lab.layout import (
    CONTAINER_POOL,
    DEFAULT_CONTROLLERS,
    HOST_ETC_MOUNT,
    HOST_STATE_MOUNT,
    LABS_ROOT,
    LABS_RUN,
    MAX_CONTROLLERS,
    MAX_HOSTS,
    NATS_CLIENT_PORT,
    HostSize,
    LabLayout,
    LabSpec,
    candidate_subnets,
    controller_names_for,
    host_names,
    parse_sizes,
    parse_zones,
    read_spec,
)
from schemas import subjects
from schemas.v1.fleet import ControllerLease
from schemas.v1.hosts import WORKER_ROLES, HostHeartbeat
from services import bus, certificates, identities, topology
from services.errors import Conflict, FerryError, InvalidInput, RuntimeFailure, Unavailable
from services.identity_files import creds_path, write_identities
from services.leases import Leases
from services.runtime.proc import run

Say = Callable[[str], None]
READY_TIMEOUT_S = 60.0
# What the host's agent.toml says: never taken from the caller's environment.
HOST_CONFIG_VARS = frozenset(
    {
        "FERRY_CONFIG", "FERRY_CONTEXT", "FERRY_HOST", "FERRY_HOST_ADDRESS", "FERRY_NATS_URL",
        "FERRY_NATS_CREDS", "FERRY_NATS_CA", "FERRY_DC_SUBNET", "FERRY_DC_GATEWAY",
        "FERRY_TLS_CA", "FERRY_TLS_CERT", "FERRY_TLS_KEY",
        "FERRY_IP_POOL", "FERRY_STATE_DIR", "FERRY_BRIDGE", "FERRY_CGROUP_PARENT",
        "FERRY_ZONE", "FERRY_CAPACITY_MEMORY_MIB", "FERRY_CAPACITY_CPUS",
    }
)  # fmt: skip
# What a controller's controller.toml says (its name; the bus is in HOST_CONFIG_VARS).
# FERRY_CONTROLLER_SWEEP_S and FERRY_CONTROLLER_POLL_S pass: tests' knobs.
CONTROLLER_CONFIG_VARS = frozenset({"FERRY_CONTROLLER_NAME"})
CONTROLLER_STOP_GRACE_S = 5.0
LAB_REQUESTER = "lab"  # the identity tests use as "another system"


@contextlib.contextmanager
def locked(layout: LabLayout) -> Iterator[None]:
    """One `lab up`/`lab down` at a time per lab."""
    LABS_RUN.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def plan(
    layout: LabLayout,
    count: int,
    allow_faults: bool = False,
    segments: int = 1,
    subnet: ipaddress.IPv4Network | None = None,
    plain_transfers: bool = False,
    *,
    zones: tuple[str, ...] = (),
    sizes: tuple[HostSize, ...] = (),
    controllers: int = DEFAULT_CONTROLLERS,
) -> LabSpec:
    """Pick a subnet no route uses yet and a free NATS port, for a new lab."""
    taken = set(kernel.routed_networks())
    for other in LABS_ROOT.glob("*/lab.json") if LABS_ROOT.exists() else []:
        with contextlib.suppress(Exception):
            taken.add(str(LabSpec.from_json(other.read_text()).subnet))
    if subnet is not None and str(subnet) in taken:
        raise Conflict(f"{subnet} is already routed on this machine", field="--subnet")
    free = (s for s in candidate_subnets(layout.lab) if str(s) not in taken and s != subnet)
    subnet = subnet or next(free)
    mgmt_subnet = next(free)
    extra = [next(free) for _ in range(segments + 1)] if segments > 1 else []
    return LabSpec(
        lab=layout.lab,
        hosts=host_names(count),
        subnet=subnet,
        nats_port=NATS_CLIENT_PORT,  # each node has a namespace of its own: no clash
        mgmt_subnet=mgmt_subnet,
        allow_faults=allow_faults,
        plain_transfers=plain_transfers,
        segment_subnets=tuple(extra[1:]),
        core_subnet=extra[0] if extra else None,
        zones=zones,
        sizes=sizes,
        controllers=controller_names_for(controllers),
    )


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """A lab's container/datacenter network: a private IPv4 /24."""
    try:
        net = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise InvalidInput(f"{text!r} is not an IPv4 network: {exc}", field="--subnet") from exc
    if net.prefixlen != 24 or not net.is_private:
        raise InvalidInput(f"{text} must be a private /24", field="--subnet")
    return net


def up(
    layout: LabLayout,
    count: int,
    say: Say,
    *,
    allow_faults: bool = False,
    plain_transfers: bool = False,
    segments: int = 1,
    subnet: str | None = None,
    select_default: bool = True,
    zones: str | None = None,
    sizes: str | None = None,
    controllers: int = DEFAULT_CONTROLLERS,
) -> LabSpec:
    """`select_default`: may the lab become `ferry`'s default context (see contexts.py).
    `zones`, `sizes`: `--zones a,b` and `--sizes 2048:2,1024:1`, cycled over the hosts."""
    wanted = parse_subnet(subnet) if subnet else None
    if not 1 <= count <= MAX_HOSTS:
        raise InvalidInput(f"must be between 1 and {MAX_HOSTS}, not {count}", field="--hosts")
    if not 1 <= segments <= count:
        raise InvalidInput(
            f"must be between 1 and the number of hosts ({count}), not {segments}",
            field="--segments",
        )
    if not 0 <= controllers <= MAX_CONTROLLERS:
        raise InvalidInput(
            f"must be between 0 and {MAX_CONTROLLERS}, not {controllers}", field="--controllers"
        )
    host_zones = parse_zones(zones, count)
    host_sizes = parse_sizes(sizes, count)
    with locked(layout):
        spec = read_spec(layout)
        if spec is not None and len(spec.hosts) != count:
            raise Conflict(
                f"lab {layout.lab!r} is already up with {len(spec.hosts)} hosts;"
                " run `ferry lab down` first to change it",
                field="--hosts",
            )
        if spec is not None and spec.allow_faults != allow_faults:
            now = "allows" if spec.allow_faults else "does not allow"
            raise Conflict(
                f"lab {layout.lab!r} is up and {now} fault injection;"
                " run `ferry lab down` first to change it",
                field="--allow-faults",
            )
        if spec is not None and spec.plain_transfers != plain_transfers:
            raise Conflict(
                f"lab {layout.lab!r} is up with transfers"
                f" {'in the clear' if spec.plain_transfers else 'over TLS'};"
                " run `ferry lab down` first to change it",
                field="--plain-transfers",
            )
        if spec is not None and spec.segments != segments:
            raise Conflict(
                f"lab {layout.lab!r} is up with {spec.segments} segment(s);"
                " run `ferry lab down` first to change it",
                field="--segments",
            )
        if spec is not None and wanted is not None and spec.subnet != wanted:
            raise Conflict(
                f"lab {layout.lab!r} is up on {spec.subnet}; run `ferry lab down` first",
                field="--subnet",
            )
        if spec is not None and spec.zones != host_zones:
            raise Conflict(
                f"lab {layout.lab!r} is up with zones {_shown(spec.zones)};"
                " run `ferry lab down` first to change them",
                field="--zones",
            )
        if spec is not None and spec.sizes != host_sizes:
            shown = _shown(tuple(f"{s.memory_mib}:{s.cpus:g}" for s in spec.sizes))
            raise Conflict(
                f"lab {layout.lab!r} is up with sizes {shown};"
                " run `ferry lab down` first to change them",
                field="--sizes",
            )
        if spec is not None and len(spec.controllers) != controllers:
            raise Conflict(
                f"lab {layout.lab!r} is up with {len(spec.controllers)} controller(s);"
                " run `ferry lab down` first to change it",
                field="--controllers",
            )
        if spec is None:
            spec = plan(
                layout, count, allow_faults, segments, wanted, plain_transfers,
                zones=host_zones, sizes=host_sizes, controllers=controllers,
            )  # fmt: skip
            layout.root.mkdir(parents=True, exist_ok=True)
            layout.lab_file.write_text(spec.to_json())
            say(
                f"lab {layout.lab}: datacenter {spec.subnet}, management {spec.mgmt_subnet},"
                f" NATS on {', '.join(spec.nats_urls)}"
            )
        _write_identities(layout, spec)
        _write_certificates(layout, spec)
        contexts.write(layout, spec, say, select_default=select_default)
        if spec.segmented:
            segments_net.ensure_router(layout, spec)
        else:
            _ensure_bridge(layout, spec)
        _ensure_mgmt_bridge(layout, spec)
        natscluster.ensure_cluster(layout, spec, say)
        asyncio.run(_ensure_topology(layout, spec, say))
        for name in controller_names(spec):
            ensure_controller(layout, spec, name, say)
        HOST_STATE_MOUNT.mkdir(parents=True, exist_ok=True)
        for host in spec.hosts:
            if spec.segmented:
                segments_net.ensure_host(layout, spec, host)
            else:
                _ensure_host_network(layout, spec, host)
            _ensure_host_mgmt(layout, spec, host)
            _give_host_creds(layout, host)
            _ensure_host_mounts(layout, host)
            ensure_agent(layout, spec, host, say)
    asyncio.run(wait_ready(spec, say))
    return spec


def _ensure_bridge(layout: LabLayout, spec: LabSpec) -> None:
    if kernel.link_exists(layout.bridge):
        return
    run(["ip", "link", "add", layout.bridge, "type", "bridge"])
    # A pinned MAC: a Linux bridge otherwise takes its lowest port's MAC, and when ports
    # come and go the change stalls traffic between hosts for tens of seconds.
    run(["ip", "link", "set", layout.bridge, "address", spec.bridge_mac()])
    run(["ip", "addr", "add", f"{spec.gateway}/{spec.subnet.prefixlen}", "dev", layout.bridge])
    run(["ip", "link", "set", layout.bridge, "up"])


def _shown(values: tuple[str, ...]) -> str:
    return ",".join(values) if values else "(none)"


def _write_identities(layout: LabLayout, spec: LabSpec) -> None:
    """What an operator does first: every identity's credentials and the servers' auth
    config (`ferry identities`); each host and controller then gets only its own."""
    wanted = [
        identities.operator(),
        *(identities.host(h) for h in spec.hosts),
        *(identities.controller(c) for c in spec.controllers),
        identities.requester(LAB_REQUESTER),
    ]
    write_identities(layout.operator_dir, wanted, [spec.nats_address(n) for n in spec.nats_nodes])


def _write_certificates(layout: LabLayout, spec: LabSpec) -> None:
    """What an operator does next (`ferry certs`): the fleet CA, and a certificate for each
    host (transfers, CRIU's page streams) and each NATS node, naming its address."""
    pki = layout.pki_dir
    ca = certificates.ensure_ca(pki, label=f"Ferry lab {layout.lab} CA")
    for host in spec.hosts:
        certificates.issue(ca, pki, host, [spec.mgmt_address(host)])
    for node in spec.nats_nodes:
        certificates.issue(ca, pki, f"n{node}", [spec.nats_address(node)])


def operator_creds(layout: LabLayout) -> Path:
    return creds_path(layout.operator_dir, identities.operator())


def requester_creds(layout: LabLayout) -> Path:
    """Credentials of the lab's stand-in for "another system" that publishes requests."""
    return creds_path(layout.operator_dir, identities.requester(LAB_REQUESTER))


def _ensure_mgmt_bridge(layout: LabLayout, spec: LabSpec) -> None:
    if not kernel.link_exists(layout.mgmt_bridge):
        run(["ip", "link", "add", layout.mgmt_bridge, "type", "bridge"])
    prefix = spec.mgmt_subnet.prefixlen
    run(["ip", "addr", "replace", f"{spec.operator_address}/{prefix}", "dev", layout.mgmt_bridge])
    run(["ip", "link", "set", layout.mgmt_bridge, "up"])


def restart_nats(layout: LabLayout, say: Say, *, lose_store: bool = False) -> None:
    """Stop the lab's NATS nodes and start them again with the same config; `lose_store`
    removes every node's JetStream store in between, as lost disks or rebuilt servers would
    (for tests and chaos). Nothing is bootstrapped: that is the operator's next step."""
    spec = read_spec(layout)
    if spec is None:
        raise InvalidInput(f"lab {layout.lab!r} is not up", field="FERRY_LAB")
    with locked(layout):
        natscluster.restart(layout, spec, say, lose_store=lose_store)


async def _ensure_topology(layout: LabLayout, spec: LabSpec, say: Say) -> None:
    """The lab's bootstrap: what `ferry bootstrap --host … --replicas 3` does on a fleet."""
    nc = await bus.connect(
        spec.nats_urls, name="ferry-lab", creds=operator_creds(layout), ca=layout.ca_file
    )
    try:
        created = await topology.create_topology_when_ready(
            nc.jetstream(), hosts=spec.hosts, replicas=len(spec.nats_nodes), say=say
        )
    finally:
        await bus.close(nc)
    if created:
        say(f"bootstrap: created {len(created)} streams, buckets and consumers")


def _ensure_host_network(layout: LabLayout, spec: LabSpec, host: str) -> None:
    ns = layout.netns(host)
    if ns not in kernel.netns_names():
        run(["ip", "netns", "add", ns])
    in_ns = ["ip", "-n", ns]
    if not kernel.link_exists(layout.uplink(host)):
        run(
            [
                "ip",
                "link",
                "add",
                layout.uplink(host),
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                ns,
            ]
        )
    run(["ip", "link", "set", layout.uplink(host), "master", layout.bridge, "up"])
    run([*in_ns, "link", "set", "lo", "up"])
    if not kernel.link_exists("br0", netns=ns):
        run([*in_ns, "link", "add", "br0", "type", "bridge"])
        run([*in_ns, "link", "set", "br0", "address", spec.host_bridge_mac(host)])
        run([*in_ns, "addr", "add", f"{spec.address(host)}/{spec.subnet.prefixlen}", "dev", "br0"])
    run([*in_ns, "link", "set", "uplink", "master", "br0", "up"])
    run([*in_ns, "link", "set", "br0", "up"])
    run([*in_ns, "route", "replace", "default", "via", spec.gateway])


def _ensure_host_mgmt(layout: LabLayout, spec: LabSpec, host: str) -> None:
    """The host's second interface, on the management network (NATS, other hosts)."""
    ns = layout.netns(host)
    link = layout.mgmt_link(host)
    if not kernel.link_exists(link):
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "mgmt", "netns", ns])
    run(["ip", "link", "set", link, "master", layout.mgmt_bridge, "up"])
    prefix = spec.mgmt_subnet.prefixlen
    run(["ip", "-n", ns, "addr", "replace", f"{spec.mgmt_address(host)}/{prefix}", "dev", "mgmt"])
    run(["ip", "-n", ns, "link", "set", "mgmt", "up"])


def _give_host_creds(layout: LabLayout, host: str) -> None:
    """The host's /etc/ferry: only its own credentials, as an operator would copy them."""
    etc = layout.host_etc(host)
    etc.mkdir(parents=True, exist_ok=True)
    etc.chmod(0o700)
    own = creds_path(layout.operator_dir, identities.host(host))
    pki = layout.pki_dir
    for source in (own, pki / f"{host}.key", pki / f"{host}.pem", pki / certificates.CA_CERT):
        shutil.copyfile(source, etc / source.name)
        (etc / source.name).chmod(0o600 if source.suffix in (".creds", ".key") else 0o644)


def _ensure_host_mounts(layout: LabLayout, host: str) -> None:
    """A persistent private mount namespace where only this host's state dir is visible."""
    mntns = layout.mntns_path(host)
    if kernel.is_mountpoint(mntns):
        return
    layout.mnt_dir.mkdir(parents=True, exist_ok=True)
    if not kernel.is_mountpoint(layout.mnt_dir):
        # A mount namespace can only be pinned on a private mount.
        run(["mount", "--bind", str(layout.mnt_dir), str(layout.mnt_dir)])
        run(["mount", "--make-private", str(layout.mnt_dir)])
    state = layout.state_dir(host)
    state.mkdir(parents=True, exist_ok=True)
    mntns.touch()
    etc = layout.host_etc(host)
    etc.mkdir(parents=True, exist_ok=True)
    HOST_ETC_MOUNT.mkdir(parents=True, exist_ok=True)
    hide = "mount -t tmpfs -o mode=755,size=1m ferry-hidden"
    script = (
        f"mount --bind {state} {HOST_STATE_MOUNT} && mount --bind {etc} {HOST_ETC_MOUNT}"
        f" && {hide} {LABS_ROOT} && {hide} {LABS_RUN}"
    )
    run(["unshare", f"--mount={mntns}", "--propagation", "slave", "sh", "-c", script])


def host_exec_prefix(layout: LabLayout, host: str) -> list[str]:
    """Run a command on a simulated host. Not `ip netns exec`: it remounts /sys, breaking runc."""
    return [
        "nsenter",
        f"--net={layout.netns_path(host)}",
        f"--mount={layout.mntns_path(host)}",
        "--",
    ]


def agent_pid(layout: LabLayout, host: str) -> int | None:
    try:
        pid = int((layout.state_dir(host) / "run" / "agent.pid").read_text())
    except (OSError, ValueError):
        return None
    if not kernel.alive(pid):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid if b"agent" in cmdline else None


AGENT_CONFIG = HOST_ETC_MOUNT / "agent.toml"


def host_config(layout: LabLayout, spec: LabSpec, host: str) -> str:
    """The host's /etc/ferry/agent.toml, as an operator writes it (deploy/systemd/)."""
    creds = HOST_ETC_MOUNT / f"{identities.host(host).user}.creds"
    servers = ", ".join(f'"{url}"' for url in spec.nats_urls)
    return "\n".join(
        [
            f"# {host} of lab {layout.lab}, written by `ferry lab up`",
            f'host = "{host}"',
            f'address = "{spec.mgmt_address(host)}"',
            f'state_dir = "{HOST_STATE_MOUNT}"',
            f'cgroup_parent = "{layout.cgroup_parent(host)}"',
            *([f'zone = "{spec.zone_of(host)}"'] if spec.zone_of(host) else []),
            "",
            *_capacity_table(spec.size_of(host)),
            "[bus]",
            f"servers = [{servers}]",
            f'creds = "{creds}"',
            f'ca = "{HOST_ETC_MOUNT / certificates.CA_CERT}"',
            "",
            *(
                []
                if spec.plain_transfers
                else [
                    "[tls]",
                    f'ca = "{HOST_ETC_MOUNT / certificates.CA_CERT}"',
                    f'cert = "{HOST_ETC_MOUNT / f"{host}.pem"}"',
                    f'key = "{HOST_ETC_MOUNT / f"{host}.key"}"',
                    "",
                ]
            ),
            "[network]",
            f'subnet = "{spec.subnet}"',
            f'gateway = "{spec.gateway}"',
            f'ip_pool = "{CONTAINER_POOL[0]}-{CONTAINER_POOL[1]}"',
            'bridge = "br0"',
            "",
        ]
    )


def _capacity_table(size: HostSize | None) -> list[str]:
    """agent.toml's [capacity], as `--sizes` declared it (nothing when it did not)."""
    if size is None:
        return []
    cpus = int(size.cpus) if size.cpus.is_integer() else size.cpus
    return ["[capacity]", f"memory_mib = {size.memory_mib}", f"cpus = {cpus}", ""]


def host_env(layout: LabLayout, spec: LabSpec) -> dict[str, str]:
    """What only a lab sets: its name (for tests' helpers) and whether faults may be injected."""
    return {"FERRY_LAB": layout.lab, "FERRY_ALLOW_FAULTS": "1" if spec.allow_faults else "0"}


def _inherited_env() -> dict[str, str]:
    """The caller's environment minus what would override the host's config file (a
    variable beats the file): test knobs such as sweep intervals still pass."""
    return {k: v for k, v in os.environ.items() if k not in HOST_CONFIG_VARS}


def ensure_agent(layout: LabLayout, spec: LabSpec, host: str, say: Say) -> None:
    """Start the host's agent unless it runs (as a host's boot does: no wait for it)."""
    if agent_pid(layout, host) is not None:
        return
    log_dir = layout.state_dir(host) / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    config = layout.host_etc(host) / "agent.toml"
    config.write_text(host_config(layout, spec, host))
    env = {**_inherited_env(), **host_env(layout, spec), "PYTHONUNBUFFERED": "1"}
    ferry = Path(sys.executable).parent / "ferry"
    with (log_dir / "agent.log").open("ab") as logfile:
        proc = subprocess.Popen(
            # What ferry-agent.service runs, inside the host's namespaces.
            [*host_exec_prefix(layout, host), str(ferry), "agent", "--config", str(AGENT_CONFIG)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=env,
            start_new_session=True,
            cwd="/",
        )
    say(f"{host}: agent started (pid {proc.pid}) at {spec.mgmt_address(host)}")


def controller_names(spec: LabSpec) -> tuple[str, ...]:
    """The fleet controller instances the lab runs: c1, c2, … (none in an older lab)."""
    return spec.controllers


def _controller_argv(layout: LabLayout, name: str) -> list[str]:
    """What ferry-controller.service runs (deploy/systemd/), with the lab's paths."""
    ferry = Path(sys.executable).parent / "ferry"
    return [str(ferry), "controller", "--config", str(layout.controller_config(name))]


def _is_controller(pid: int, config: Path) -> bool:
    """Is `pid` a `ferry controller --config <config>` (not a pid reused since)?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = str(config).encode()
    return b"controller" in argv and any(
        a == b"--config" and b == want for a, b in itertools.pairwise(argv)
    )


def controller_pid(layout: LabLayout, name: str) -> int | None:
    """The pid of the lab's controller `name` if it runs (stopped with SIGSTOP counts)."""
    try:
        pid = int(layout.controller_pid_file(name).read_text())
    except (OSError, ValueError):
        return None
    if not kernel.alive(pid) or not _is_controller(pid, layout.controller_config(name)):
        return None
    return pid


def controller_config(layout: LabLayout, spec: LabSpec, name: str) -> str:
    """The controller's controller.toml, as an operator writes it (deploy/systemd/)."""
    here = layout.controller_dir(name)
    servers = ", ".join(f'"{url}"' for url in spec.nats_urls)
    return "\n".join(
        [
            f"# fleet controller {name} of lab {layout.lab}, written by `ferry lab up`",
            f'name = "{name}"',
            "",
            "[bus]",
            f"servers = [{servers}]",
            f'creds = "{creds_path(here, identities.controller(name))}"',
            f'ca = "{here / certificates.CA_CERT}"',
            "",
        ]
    )


def _give_controller_creds(layout: LabLayout, name: str) -> None:
    """The controller's own credentials and the fleet CA, as an operator would copy them."""
    here = layout.controller_dir(name)
    here.mkdir(parents=True, exist_ok=True)
    here.chmod(0o700)
    own = creds_path(layout.operator_dir, identities.controller(name))
    for source, mode in ((own, 0o600), (layout.ca_file, 0o644)):
        shutil.copyfile(source, here / source.name)
        (here / source.name).chmod(mode)


def controller_env(layout: LabLayout) -> dict[str, str]:
    """The caller's environment minus what the controller's file says (its bus, its name);
    test knobs such as FERRY_CONTROLLER_SWEEP_S pass."""
    inherited = {k: v for k, v in _inherited_env().items() if k not in CONTROLLER_CONFIG_VARS}
    return {**inherited, "FERRY_LAB": layout.lab, "PYTHONUNBUFFERED": "1"}


def ensure_controller(layout: LabLayout, spec: LabSpec, name: str, say: Say) -> None:
    """Start the lab's fleet controller `name` unless it runs (no wait for it to lead)."""
    if controller_pid(layout, name) is not None:
        return
    _give_controller_creds(layout, name)
    layout.controller_config(name).write_text(controller_config(layout, spec, name))
    with layout.controller_log(name).open("ab") as logfile:
        proc = subprocess.Popen(
            # From the root namespace, which reaches the lab's NATS as the operator does.
            _controller_argv(layout, name),
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=controller_env(layout),
            start_new_session=True,
            cwd="/",
        )
    layout.controller_pid_file(name).write_text(f"{proc.pid}\n")
    say(f"controller {name}: started (pid {proc.pid}), log {layout.controller_log(name)}")


def _controller_pids(layout: LabLayout) -> set[int]:
    """Every running controller of the lab, found by its config path (lab.json or not)."""
    configs = (
        [d / "controller.toml" for d in layout.controllers_dir.iterdir() if d.is_dir()]
        if layout.controllers_dir.is_dir()
        else []
    )
    found = kernel.pids_with_cmdline(str(layout.controllers_dir))
    return {pid for pid in found if any(_is_controller(pid, c) for c in configs)}


def stop_controllers(layout: LabLayout, say: Say) -> None:
    """SIGTERM every controller of the lab (SIGCONT first: one may be SIGSTOPped), SIGKILL
    what is left after a grace. The active one gives its lease up: NATS must still run."""
    pids = _controller_pids(layout)
    if not pids:
        return
    say(f"stopping {len(pids)} fleet controller(s)")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    kernel.terminate(pids, grace=CONTROLLER_STOP_GRACE_S)


async def _operator_nats(spec: LabSpec, timeout: float) -> NATS | None:
    layout = LabLayout(spec.lab)
    try:
        return await bus.connect(
            spec.nats_urls,
            name="ferry-cli",
            creds=operator_creds(layout),
            ca=layout.ca_file,
            connect_timeout=timeout,
            give_up_after=3 * timeout,
        )
    except Unavailable:
        return None


async def active_controller(spec: LabSpec, timeout: float = 2.0) -> ControllerLease | None:
    """The lease of the active fleet controller, if one holds it and has written its term."""
    nc = await _operator_nats(spec, timeout)
    if nc is None:
        return None
    try:
        leases = await Leases.open(nc.jetstream(), ControllerLease)
        found = await leases.read(subjects.CONTROLLER_LEASE)
    except FerryError:  # no bucket yet, or the bus did not answer
        return None
    finally:
        await bus.close(nc)
    if found.state == "held" and found.payload is not None and found.payload.term > 0:
        return found.payload
    return None


async def host_health(spec: LabSpec, timeout: float = 2.0) -> dict[str, HostHeartbeat | None]:
    """Each host's latest heartbeat if the host and all four of its workers are alive."""
    health: dict[str, HostHeartbeat | None] = {h: None for h in spec.hosts}
    nc = await _operator_nats(spec, timeout)
    if nc is None:
        return health
    try:
        kv = await bus.bucket(nc.jetstream(), subjects.HOSTS_BUCKET)
        for host in spec.hosts:
            try:
                beat = HostHeartbeat.from_bytes((await kv.get(host)).value or b"")
                for role in WORKER_ROLES:
                    await kv.get(subjects.worker_key(host, role))
            except Exception:  # a missing key means that part has not beaten lately
                continue
            if all(w.pid for w in beat.workers) and len(beat.workers) == len(WORKER_ROLES):
                health[host] = beat
    finally:
        await bus.close(nc)
    return health


async def wait_ready(spec: LabSpec, say: Say, timeout: float = READY_TIMEOUT_S) -> None:
    """Until every host and its workers beat, and (if the lab runs controllers) one fleet
    controller is active: without one, nothing can be started or moved."""
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    leader = None if controller_names(spec) else "none"
    while True:
        if len(reported) < len(spec.hosts):
            health = await host_health(spec)
            for host, beat in health.items():
                if beat is not None and host not in reported:
                    say(f"{host}: ready (workers: {', '.join(WORKER_ROLES)})")
                    reported.add(host)
        if leader is None:
            lease = await active_controller(spec)
            if lease is not None:
                leader = lease.instance
                say(f"controller {leader}: active (term {lease.term}, pid {lease.holder.pid})")
        if len(reported) == len(spec.hosts) and leader is not None:
            return
        if time.monotonic() > deadline:
            missing = sorted(set(spec.hosts) - reported)
            if missing:
                raise RuntimeFailure(
                    f"hosts {', '.join(missing)} not ready after {timeout:.0f}s;"
                    f" see their logs under {LABS_ROOT}/<lab>/hosts/<host>/log/"
                )
            layout = LabLayout(spec.lab)
            logs = ", ".join(str(layout.controller_log(c)) for c in controller_names(spec))
            raise RuntimeFailure(
                f"no fleet controller active after {timeout:.0f}s"
                f" (lease {subjects.CONTROLLER_LEASE} in {subjects.LEASES_BUCKET});"
                f" see their logs: {logs}"
            )
        await asyncio.sleep(0.2)


def down(layout: LabLayout, say: Say) -> None:
    """Remove every trace of the lab; finds things by name, so it works without lab.json."""
    with locked(layout):
        stop_controllers(layout, say)  # while NATS runs: the active one gives its lease up
        host_namespaces = [n for n in kernel.netns_names() if n.startswith(f"{layout.lab}-")]
        inodes = {
            ino
            for ino in (
                [kernel.ns_inode(Path("/run/netns") / n) for n in host_namespaces]
                + [
                    kernel.ns_inode(p)
                    for p in (layout.mnt_dir.glob("*") if layout.mnt_dir.is_dir() else [])
                ]
            )
            if ino is not None
        }
        pids = kernel.pids_in_namespaces(inodes)
        if pids:
            say(f"stopping {len(pids)} host processes")
        kernel.terminate(pids)
        for top in kernel.cgroup_dirs(layout.cgroup_name):
            kernel.kill_cgroup_tree(top)
        kernel.terminate(kernel.pids_with_cmdline(str(layout.nats_dir)))
        for mount in kernel.mounts_under(layout.run) + kernel.mounts_under(layout.root):
            run(["umount", "--lazy", str(mount)], check=False)
        for name in host_namespaces:
            run(["ip", "netns", "del", name], check=False)
        for link in kernel.links_with_prefix(f"{layout.lab}-"):
            run(["ip", "link", "del", link], check=False)
        contexts.remove(layout, say)
        shutil.rmtree(layout.root, ignore_errors=True)
        shutil.rmtree(layout.run, ignore_errors=True)
    layout.lock_file.unlink(missing_ok=True)
    say(f"lab {layout.lab} is down")
