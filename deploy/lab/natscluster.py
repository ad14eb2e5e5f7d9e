"""The lab's bus: a 3-node JetStream cluster on the management network, as on real machines.

Each node is a network namespace of its own with one link, to the management bridge: it
has no route to the containers' network, so no container can reach it. Every node runs
the shipped `deploy/nats/nats.conf` unchanged, with the environment the systemd unit's
`EnvironmentFile` would give it, and the `auth.conf`/`routes.conf` that `ferry identities`
wrote for the lab's operator.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deploy.lab import kernel
from deploy.lab.layout import NATS_MONITOR_PORT, LabLayout, LabSpec
from services import certificates
from services.errors import RuntimeFailure
from services.identity_files import AUTH_FILE, ROUTES_FILE
from services.runtime.proc import run

Say = Callable[[str], None]
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "nats" / "nats.conf"
READY_TIMEOUT_S = 30.0


def nats_binary() -> Path:
    import sys

    path = Path(sys.executable).parent / "nats-server"
    if not path.exists():
        raise RuntimeFailure(f"nats-server not found at {path} (run `make setup`)")
    return path


def node_env(layout: LabLayout, spec: LabSpec, node: int) -> dict[str, str]:
    """What /etc/ferry/nats.env says on node `node`."""
    home = layout.nats_node_dir(node)
    return {
        "FERRY_NATS_NAME": f"n{node}",
        "FERRY_NATS_HOST": spec.nats_address(node),
        "FERRY_NATS_STORE": str(home / "store"),
        "FERRY_NATS_TLS_CERT": str(home / f"n{node}.pem"),
        "FERRY_NATS_TLS_KEY": str(home / f"n{node}.key"),
        "FERRY_NATS_TLS_CA": str(home / certificates.CA_CERT),
    }


def ensure_node_network(layout: LabLayout, spec: LabSpec, node: int) -> None:
    ns = layout.nats_netns(node)
    if ns not in kernel.netns_names():
        run(["ip", "netns", "add", ns])
    link = ns  # the root end of the veth is named like the namespace
    if not kernel.link_exists(link):
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "mgmt", "netns", ns])
    run(["ip", "link", "set", link, "master", layout.mgmt_bridge, "up"])
    prefix = spec.mgmt_subnet.prefixlen
    run(["ip", "-n", ns, "addr", "replace", f"{spec.nats_address(node)}/{prefix}", "dev", "mgmt"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", "mgmt", "up"])


def node_pid(layout: LabLayout, node: int) -> int | None:
    pids = kernel.pids_with_cmdline(str(layout.nats_node_dir(node) / "nats.conf"))
    return min(pids) if pids else None


def start_node(layout: LabLayout, spec: LabSpec, node: int) -> None:
    """Start one node's nats-server if it is not running (its store is kept)."""
    if node_pid(layout, node) is not None:
        return
    home = layout.nats_node_dir(node)
    home.mkdir(parents=True, exist_ok=True)
    # The node's /etc/ferry: the shipped config and what `ferry identities` wrote.
    shutil.copyfile(SHIPPED_CONFIG, home / "nats.conf")
    for name in (AUTH_FILE, ROUTES_FILE):
        shutil.copyfile(layout.operator_dir / name, home / name)
        (home / name).chmod(0o600)
    # ...and what `ferry certs` wrote for it (the lab keeps them in the operator's pki/).
    pki = layout.pki_dir
    for name in (f"n{node}.pem", f"n{node}.key", certificates.CA_CERT):
        shutil.copyfile(pki / name, home / name)
        (home / name).chmod(0o600 if name.endswith(".key") else 0o644)
    with (home / "nats.log").open("ab") as logfile:
        subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{layout.nats_netns(node)}",
                "--",
                str(nats_binary()),
                "-c",
                str(home / "nats.conf"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            env=node_env(layout, spec, node),
            start_new_session=True,
        )


def stop_node(layout: LabLayout, node: int, *, kill: bool = False) -> None:
    pid = node_pid(layout, node)
    if pid is None:
        return
    if kill:
        kernel.kill([pid])
    else:
        kernel.terminate([pid], grace=10.0)


def _healthy(spec: LabSpec, node: int) -> bool:
    url = f"http://{spec.nats_address(node)}:{NATS_MONITOR_PORT}/healthz"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as reply:
        return bool(reply.status == 200)
    return False


def wait_healthy(spec: LabSpec, nodes: tuple[int, ...], say: Say) -> None:
    """Until each node says it is healthy, JetStream included (a meta leader elected)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    waiting = set(nodes)
    while waiting:
        waiting = {n for n in waiting if not _healthy(spec, n)}
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise RuntimeFailure(
                f"NATS nodes {', '.join(f'n{n}' for n in sorted(waiting))} not healthy after"
                f" {READY_TIMEOUT_S:.0f}s; see their logs under {spec.lab}/nats/n*/nats.log"
            )
        time.sleep(0.2)
    say(f"NATS cluster healthy: {', '.join(spec.nats_urls)}")


def ensure_cluster(layout: LabLayout, spec: LabSpec, say: Say) -> None:
    for node in spec.nats_nodes:
        ensure_node_network(layout, spec, node)
        start_node(layout, spec, node)
    wait_healthy(spec, spec.nats_nodes, say)


def restart(layout: LabLayout, spec: LabSpec, say: Say, *, lose_store: bool = False) -> None:
    """Stop every node and start it again; `lose_store` removes every node's JetStream
    store in between, as if the whole cluster's disks were lost."""
    for node in spec.nats_nodes:
        stop_node(layout, node)
    if lose_store:
        for node in spec.nats_nodes:
            shutil.rmtree(layout.nats_node_dir(node) / "store", ignore_errors=True)
        say(f"lab {layout.lab}: the JetStream store of every node removed")
    for node in spec.nats_nodes:
        start_node(layout, spec, node)
    wait_healthy(spec, spec.nats_nodes, say)


def jsz(spec: LabSpec, node: int) -> dict[str, object]:
    """A node's JetStream report (monitoring endpoint): meta leader, streams' leaders."""
    url = f"http://{spec.nats_address(node)}:{NATS_MONITOR_PORT}/jsz?streams=true&consumers=true"
    with urllib.request.urlopen(url, timeout=2) as reply:
        data: dict[str, object] = json.loads(reply.read())
    return data
