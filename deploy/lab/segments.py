"""Segmented labs: hosts on K routed networks ("zones") joined by a router namespace.

Containers keep one address space across all segments: every host's container bridge
and the router join a VXLAN overlay (one VNI, head-end replication to every other
endpoint), so a container keeps its IP and MAC when it moves to another segment and a
gratuitous ARP re-points the overlay's forwarding tables. The router owns the
containers' gateway address and routes between the overlay, the segments and the root
namespace (where NATS listens on the core link).
"""

from __future__ import annotations

from deploy.lab import kernel
from deploy.lab.layout import LabLayout, LabSpec
from services.runtime.proc import run

VXLAN_PORT = "4789"
UNDERLAY_MTU = "1600"  # room for VXLAN's 50 bytes, so containers keep a 1500-byte MTU


def _veth(root_end: str, peer: str, netns: str) -> None:
    if not kernel.link_exists(root_end):
        run(["ip", "link", "add", root_end, "mtu", UNDERLAY_MTU, "type", "veth",
             "peer", "name", peer, "mtu", UNDERLAY_MTU, "netns", netns])  # fmt: skip


def _bridge(name: str) -> None:
    if not kernel.link_exists(name):
        run(["ip", "link", "add", name, "mtu", UNDERLAY_MTU, "type", "bridge"])
    run(["ip", "link", "set", name, "up"])


def _vtep(netns: str, local: str, peers: list[str], bridge: str, vni: int) -> None:
    """A VXLAN port on `bridge` in `netns`, flooding to every peer endpoint."""
    ip = ["ip", "-n", netns]
    if not kernel.link_exists("vxlan0", netns=netns):
        run([*ip, "link", "add", "vxlan0", "mtu", "1500", "type", "vxlan", "id", str(vni),
             "dstport", VXLAN_PORT, "local", local])  # fmt: skip
        for peer in peers:
            run(["bridge", "-n", netns, "fdb", "append", "00:00:00:00:00:00",
                 "dev", "vxlan0", "dst", peer])  # fmt: skip
    run([*ip, "link", "set", "vxlan0", "master", bridge, "up"])


def _endpoints(spec: LabSpec) -> dict[str, str]:
    """VXLAN endpoint addresses: every host, and the overlay's gateway."""
    points = {host: spec.address(host) for host in spec.hosts}
    points["gateway"] = spec.vtep_gateway_address
    return points


def ensure_router(layout: LabLayout, spec: LabSpec) -> None:
    """Router: one leg per segment, one to the root namespace, one to the overlay gateway."""
    rt, gw = layout.router_netns, layout.gateway_netns
    for ns in (rt, gw):
        if ns not in kernel.netns_names():
            run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    ip = ["ip", "-n", rt]
    run(["nsenter", f"--net=/run/netns/{rt}", "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for segment in range(1, spec.segments + 1):
        bridge = layout.segment_bridge(segment)
        _bridge(bridge)
        _veth(f"{bridge}r", f"s{segment}", rt)
        run(["ip", "link", "set", f"{bridge}r", "master", bridge, "up"])
        net = spec.segment_subnets[segment - 1]
        run([*ip, "addr", "replace", f"{spec.segment_gateway(segment)}/{net.prefixlen}",
             "dev", f"s{segment}"])  # fmt: skip
        run([*ip, "link", "set", f"s{segment}", "up"])
    # The root namespace reaches everything through the router's core link (a /30).
    _veth(layout.core_link, "core", rt)
    run(["ip", "addr", "replace", f"{spec.core_address}/30", "dev", layout.core_link])
    run(["ip", "link", "set", layout.core_link, "up"])
    run([*ip, "addr", "replace", f"{spec.router_core_address}/30", "dev", "core"])
    run([*ip, "link", "set", "core", "up"])
    for net in (spec.subnet, *spec.segment_subnets):
        run(["ip", "route", "replace", str(net), "via", spec.router_core_address])
    # The overlay gateway hangs off the router on a /30 of its own.
    if not kernel.link_exists("gw", netns=rt):
        run([*ip, "link", "add", "gw", "mtu", UNDERLAY_MTU, "type", "veth",
             "peer", "name", "uplink", "mtu", UNDERLAY_MTU, "netns", gw])  # fmt: skip
    run([*ip, "addr", "replace", f"{spec.router_gw_address}/30", "dev", "gw"])
    run([*ip, "link", "set", "gw", "up"])
    run([*ip, "route", "replace", str(spec.subnet), "via", spec.vtep_gateway_address])
    gip = ["ip", "-n", gw]
    run([*gip, "addr", "replace", f"{spec.vtep_gateway_address}/30", "dev", "uplink"])
    run([*gip, "link", "set", "uplink", "up"])
    run([*gip, "route", "replace", "default", "via", spec.router_gw_address])
    run(["nsenter", f"--net=/run/netns/{gw}", "sysctl", "-qw", "net.ipv4.ip_forward=1"])
    # The containers' default gateway, on the overlay.
    if not kernel.link_exists("ovl", netns=gw):
        run([*gip, "link", "add", "ovl", "type", "bridge"])
        run([*gip, "link", "set", "ovl", "address", spec.bridge_mac()])
    run([*gip, "addr", "replace", f"{spec.gateway}/{spec.subnet.prefixlen}", "dev", "ovl"])
    run([*gip, "link", "set", "ovl", "up"])
    points = _endpoints(spec)
    others = [a for n, a in points.items() if n != "gateway"]
    _vtep(gw, points["gateway"], others, "ovl", spec.vni)


def ensure_host(layout: LabLayout, spec: LabSpec, host: str) -> None:
    """A host on its segment: routed uplink, and a container bridge joined to the overlay."""
    ns = layout.netns(host)
    if ns not in kernel.netns_names():
        run(["ip", "netns", "add", ns])
    ip = ["ip", "-n", ns]
    segment = spec.segment_of(host)
    _veth(layout.uplink(host), "uplink", ns)
    run(["ip", "link", "set", layout.uplink(host), "master", layout.segment_bridge(segment), "up"])
    run([*ip, "link", "set", "lo", "up"])
    net = spec.segment_subnets[segment - 1]
    run([*ip, "addr", "replace", f"{spec.address(host)}/{net.prefixlen}", "dev", "uplink"])
    run([*ip, "link", "set", "uplink", "up"])
    run([*ip, "route", "replace", "default", "via", spec.segment_gateway(segment)])
    if not kernel.link_exists("br0", netns=ns):
        run([*ip, "link", "add", "br0", "type", "bridge"])
        run([*ip, "link", "set", "br0", "address", spec.host_bridge_mac(host)])
    run([*ip, "link", "set", "br0", "up"])
    points = _endpoints(spec)
    _vtep(ns, points[host], [a for n, a in points.items() if n != host], "br0", spec.vni)
