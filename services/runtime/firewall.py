"""Keep tenants off the host: nothing a container sends reaches the host itself.

Containers hang off the host's container bridge. A packet from one of them addressed to
the host — any of its addresses: the kernel accepts a packet for a local address on any
interface — reaches every port the host listens on, CRIU's page servers among them (a
post-copy dump's page server listens on every address whatever it is told). So the host
drops, in its INPUT chain, every packet that arrives over the container bridge unless it
answers a connection the host opened itself, and every new connection from the containers'
subnet on any other interface (a router that forwarded tenants' packets onto the
management network would otherwise bring them in there). Traffic between containers and
their clients is bridged or forwarded, never INPUT, and is not touched. The host's own
Ferry traffic uses its management address on another interface.

The rules live in a chain of their own, `FERRY-TENANTS`, jumped to first from INPUT;
ensuring them is idempotent (the chain is rebuilt, the jump added once).
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess
from collections.abc import Callable

from services.errors import RuntimeFailure

CHAIN = "FERRY-TENANTS"


def _tool(family: str) -> str | None:
    return shutil.which("iptables" if family == "ipv4" else "ip6tables")


def _run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tool, "-w", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeFailure(
            f"{tool} {' '.join(args)} failed: {done.stderr.strip()}", retryable=True
        )
    return done


NEIGHBOUR_DISCOVERY = ("neighbour-solicitation", "neighbour-advertisement")


def rules(bridge: str, subnet: str | None = None, *, ipv6: bool = False) -> list[list[str]]:
    """The chain's rules, in order (pure: tests read them). `subnet`: the containers' IPv4
    network. IPv6 keeps neighbour discovery (IPv4's ARP is not filtered by iptables at all):
    without it a container could not even answer the host's own packets."""
    neighbours = [
        ["-i", bridge, "-p", "ipv6-icmp", "--icmpv6-type", kind, "-j", "RETURN"]
        for kind in NEIGHBOUR_DISCOVERY
    ]
    from_bridge = [
        ["-i", bridge, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
        *(neighbours if ipv6 else []),
        ["-i", bridge, "-j", "DROP"],
    ]
    if subnet is None:
        return from_bridge
    return [
        *from_bridge,
        ["!", "-i", "lo", "-s", subnet, "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP"],
    ]


def fence_tenants(bridge: str, subnet: str) -> list[str]:
    """Install the chain for IPv4 and IPv6 (when ip6tables exists); returns the families
    fenced. IPv4 is required: without it the host would be open."""
    fenced = []
    for family in ("ipv4", "ipv6"):
        tool = _tool(family)
        if tool is None:
            if family == "ipv4":
                raise RuntimeFailure("iptables is not installed: cannot keep tenants off the host")
            continue
        if _run(tool, "-n", "-L", CHAIN, check=False).returncode != 0:
            _run(tool, "-N", CHAIN)
        _run(tool, "-F", CHAIN)
        ipv6 = family == "ipv6"
        for rule in rules(bridge, None if ipv6 else subnet, ipv6=ipv6):
            _run(tool, "-A", CHAIN, *rule)
        if _run(tool, "-C", "INPUT", "-j", CHAIN, check=False).returncode != 0:
            _run(tool, "-I", "INPUT", "1", "-j", CHAIN)
        fenced.append(family)
    return fenced


# -- CRIU's page servers: only the named peer ----------------------------------------------
#
# A CRIU page server takes the first connection that comes and ends with it: a stop-and-copy
# page server that a stranger connects to first fails the dump, and a post-copy source's
# that a stranger connects to and closes (TLS or not) ends its lazy serving. TLS cannot
# help: the listening side checks only that the peer's certificate is of the CA. So each
# port a page server listens on admits the one peer of its migration and drops the rest,
# in a chain of its own (`FERRY-PEERS`, jumped to from INPUT). The host's own loopback is
# left alone. Rules are tagged with the migration: forgotten when it ends here, and any
# left for a port are replaced when a new page server takes that port.

PEERS_CHAIN = "FERRY-PEERS"


def _tag(migration_id: str) -> str:
    return f"ferry-migration:{migration_id}"


def peer_rules(port: int, peer: str, migration_id: str) -> list[list[str]]:
    """Admit `peer` to `port`, drop everyone else (pure: tests read them)."""
    match = ["-p", "tcp", "--dport", str(port), "-m", "comment", "--comment", _tag(migration_id)]
    # RETURN, not ACCEPT: the rest of INPUT (the tenants' fence) still judges the packet.
    return [[*match, "-s", peer, "-j", "RETURN"], [*match, "-j", "DROP"]]


def _peer_tool(peer: str) -> str:
    family = "ipv6" if ipaddress.ip_address(peer).version == 6 else "ipv4"
    tool = _tool(family)
    if tool is None:
        raise RuntimeFailure(f"no {'ip6tables' if family == 'ipv6' else 'iptables'} here")
    return tool


def _peers_chain(tool: str) -> None:
    if _run(tool, "-n", "-L", PEERS_CHAIN, check=False).returncode != 0:
        _run(tool, "-N", PEERS_CHAIN)
        _run(tool, "-A", PEERS_CHAIN, "-i", "lo", "-j", "RETURN")
    if _run(tool, "-C", "INPUT", "-j", PEERS_CHAIN, check=False).returncode != 0:
        _run(tool, "-I", "INPUT", "1", "-j", PEERS_CHAIN)


def _delete_where(tool: str, wanted: Callable[[str], bool]) -> None:
    listing = _run(tool, "-S", PEERS_CHAIN, check=False).stdout.splitlines()
    for line in listing:
        if line.startswith(f"-A {PEERS_CHAIN} ") and wanted(line):
            _run(tool, "-D", *shlex.split(line)[1:], check=False)


def admit_only(port: int, peer: str, migration_id: str) -> None:
    """From now on `port` takes connections from `peer` only (and this host's loopback)."""
    tool = _peer_tool(peer)
    _peers_chain(tool)
    _delete_where(tool, lambda line: f"--dport {port} " in line)
    for rule in peer_rules(port, peer, migration_id):
        _run(tool, "-A", PEERS_CHAIN, *rule)


def forget_peers(migration_id: str) -> None:
    """Remove the migration's rules (harmless when there are none)."""
    for family in ("ipv4", "ipv6"):
        tool = _tool(family)
        if tool is not None and _run(tool, "-n", "-L", PEERS_CHAIN, check=False).returncode == 0:
            _delete_where(tool, lambda line: _tag(migration_id) in line)
