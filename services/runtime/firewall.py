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

import shutil
import subprocess

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
