"""Bringing a lab up and tearing it down, idempotently.

`up` ensures each piece exists (bridge, NATS, host namespaces, agents) and skips what
is already there, so running it again is a no-op and a half-built lab heals. `down`
finds everything by the lab's name prefix, not by its records, so it also clears a lab
whose creator was killed halfway. `up` also writes the lab's bus context for `ferry`, and
`down` removes it (deploy/lab/contexts.py says where and when).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from deploy.lab import contexts, kernel
from deploy.lab import segments as segments_net
from deploy.lab.layout import (
    CONTAINER_POOL,
    HOST_STATE_MOUNT,
    LABS_ROOT,
    LABS_RUN,
    MAX_HOSTS,
    LabLayout,
    LabSpec,
    candidate_ports,
    candidate_subnets,
    host_names,
    read_spec,
)
from schemas import subjects
from schemas.v1.hosts import WORKER_ROLES, HostHeartbeat
from services import bus
from services.errors import Conflict, InvalidInput, RuntimeFailure, Unavailable
from services.runtime.proc import run

Say = Callable[[str], None]
READY_TIMEOUT_S = 60.0
NATS_READY_TIMEOUT_S = 10.0


@contextlib.contextmanager
def locked(layout: LabLayout) -> Iterator[None]:
    """One `lab up`/`lab down` at a time per lab."""
    LABS_RUN.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def nats_binary() -> Path:
    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        raise RuntimeFailure(f"nats-server not found at {path} (run `make setup`)")
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def plan(
    layout: LabLayout,
    count: int,
    allow_faults: bool = False,
    segments: int = 1,
    subnet: ipaddress.IPv4Network | None = None,
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
    extra = [next(free) for _ in range(segments + 1)] if segments > 1 else []
    port = next(p for p in candidate_ports(layout.lab) if _port_free(p))
    return LabSpec(
        lab=layout.lab,
        hosts=host_names(count),
        subnet=subnet,
        nats_port=port,
        allow_faults=allow_faults,
        segment_subnets=tuple(extra[1:]),
        core_subnet=extra[0] if extra else None,
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
    segments: int = 1,
    subnet: str | None = None,
    select_default: bool = True,
) -> LabSpec:
    """`select_default`: may the lab become `ferry`'s default context (see contexts.py)."""
    wanted = parse_subnet(subnet) if subnet else None
    if not 1 <= count <= MAX_HOSTS:
        raise InvalidInput(f"must be between 1 and {MAX_HOSTS}, not {count}", field="--hosts")
    if not 1 <= segments <= count:
        raise InvalidInput(
            f"must be between 1 and the number of hosts ({count}), not {segments}",
            field="--segments",
        )
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
        if spec is None:
            spec = plan(layout, count, allow_faults, segments, wanted)
            layout.root.mkdir(parents=True, exist_ok=True)
            layout.lab_file.write_text(spec.to_json())
            say(f"lab {layout.lab}: datacenter {spec.subnet}, NATS on {spec.nats_url}")
        contexts.write(layout, spec, say, select_default=select_default)
        if spec.segmented:
            segments_net.ensure_router(layout, spec)
        else:
            _ensure_bridge(layout, spec)
        _ensure_nats(layout, spec, say)
        asyncio.run(_ensure_topology(spec, say))
        HOST_STATE_MOUNT.mkdir(parents=True, exist_ok=True)
        for host in spec.hosts:
            if spec.segmented:
                segments_net.ensure_host(layout, spec, host)
            else:
                _ensure_host_network(layout, spec, host)
            _ensure_host_mounts(layout, host)
            _ensure_agent(layout, spec, host, say)
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


def _nats_pid(layout: LabLayout) -> int | None:
    try:
        pid = int((layout.nats_dir / "nats.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if kernel.alive(pid) else None


def _ensure_nats(layout: LabLayout, spec: LabSpec, say: Say) -> None:
    if _nats_pid(layout) is not None:
        return
    layout.nats_dir.mkdir(parents=True, exist_ok=True)
    conf = layout.nats_dir / "nats.conf"
    conf.write_text(
        f'server_name: "{layout.lab}-nats"\n'
        f'listen: "{spec.nats_address}:{spec.nats_port}"\n'
        f'pid_file: "{layout.nats_dir / "nats.pid"}"\n'
        "max_payload: 8MB\n"
        f'jetstream {{ store_dir: "{layout.nats_dir / "store"}" }}\n'
    )
    with (layout.nats_dir / "nats.log").open("ab") as logfile:
        subprocess.Popen(
            [str(nats_binary()), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
        )
    deadline = time.monotonic() + NATS_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((spec.nats_address, spec.nats_port), 0.2),
        ):
            say(f"nats-server up on {spec.nats_address}:{spec.nats_port}")
            return
        time.sleep(0.05)
    tail = (layout.nats_dir / "nats.log").read_text()[-500:]
    raise RuntimeFailure(f"nats-server did not start within {NATS_READY_TIMEOUT_S:.0f}s: {tail}")


def restart_nats(layout: LabLayout, say: Say, *, lose_store: bool = False) -> None:
    """Stop the lab's nats-server and start it again with the same config; `lose_store`
    removes its JetStream store in between, as a lost disk or a rebuilt server would (for
    tests and chaos). Nothing is bootstrapped: that is the operator's next step."""
    spec = read_spec(layout)
    if spec is None:
        raise InvalidInput(f"lab {layout.lab!r} is not up", field="FERRY_LAB")
    with locked(layout):
        pid = _nats_pid(layout)
        if pid is not None:
            kernel.terminate([pid], grace=10.0)
        if lose_store:
            shutil.rmtree(layout.nats_dir / "store", ignore_errors=True)
            say(f"lab {layout.lab}: JetStream store removed")
        _ensure_nats(layout, spec, say)


async def _ensure_topology(spec: LabSpec, say: Say) -> None:
    """The lab's bootstrap: what `ferry bootstrap` does on a real fleet."""
    nc = await bus.connect(spec.nats_url, name="ferry-lab")
    try:
        created = await bus.create_topology(nc.jetstream())
    finally:
        await nc.close()
    if created:
        say(f"bootstrap: created {', '.join(created)}")


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
    hide = "mount -t tmpfs -o mode=755,size=1m ferry-hidden"
    script = f"mount --bind {state} {HOST_STATE_MOUNT} && {hide} {LABS_ROOT} && {hide} {LABS_RUN}"
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
    return pid if b"services.agent" in cmdline else None


def host_env(layout: LabLayout, spec: LabSpec, host: str) -> dict[str, str]:
    return {
        "FERRY_HOST": host,
        "FERRY_HOST_ADDRESS": spec.address(host),
        "FERRY_NATS_URL": spec.nats_url,
        "FERRY_DC_SUBNET": str(spec.subnet),
        "FERRY_DC_GATEWAY": spec.gateway,
        "FERRY_IP_POOL": f"{CONTAINER_POOL[0]}-{CONTAINER_POOL[1]}",
        "FERRY_STATE_DIR": str(HOST_STATE_MOUNT),
        "FERRY_BRIDGE": "br0",
        "FERRY_CGROUP_PARENT": layout.cgroup_parent(host),
        "FERRY_LAB": layout.lab,
        "FERRY_ALLOW_FAULTS": "1" if spec.allow_faults else "0",
    }


def _ensure_agent(layout: LabLayout, spec: LabSpec, host: str, say: Say) -> None:
    if agent_pid(layout, host) is not None:
        return
    log_dir = layout.state_dir(host) / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **host_env(layout, spec, host), "PYTHONUNBUFFERED": "1"}
    with (log_dir / "agent.log").open("ab") as logfile:
        proc = subprocess.Popen(
            [*host_exec_prefix(layout, host), sys.executable, "-m", "services.agent"],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=env,
            start_new_session=True,
            cwd="/",
        )
    say(f"{host}: agent started (pid {proc.pid}) at {spec.address(host)}")


async def host_health(spec: LabSpec, timeout: float = 2.0) -> dict[str, HostHeartbeat | None]:
    """Each host's latest heartbeat if the host and all four of its workers are alive."""
    health: dict[str, HostHeartbeat | None] = {h: None for h in spec.hosts}
    try:
        nc = await bus.connect(spec.nats_url, name="ferry-cli", connect_timeout=timeout)
    except Unavailable:
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
        await nc.close()
    return health


async def wait_ready(spec: LabSpec, say: Say, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    while True:
        health = await host_health(spec)
        for host, beat in health.items():
            if beat is not None and host not in reported:
                say(f"{host}: ready (workers: {', '.join(WORKER_ROLES)})")
                reported.add(host)
        if len(reported) == len(spec.hosts):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(spec.hosts) - reported)
            raise RuntimeFailure(
                f"hosts {', '.join(missing)} not ready after {timeout:.0f}s;"
                f" see their logs under {LABS_ROOT}/<lab>/hosts/<host>/log/"
            )
        await asyncio.sleep(0.2)


def down(layout: LabLayout, say: Say) -> None:
    """Remove every trace of the lab; finds things by name, so it works without lab.json."""
    with locked(layout):
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
        nats = kernel.pids_with_cmdline(str(layout.nats_dir / "nats.conf"))
        kernel.terminate(nats)
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
