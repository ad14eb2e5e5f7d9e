"""Unsolicited IPv6 neighbour advertisements: the IPv6 counterpart of a gratuitous ARP.

Run inside the container's network namespace after a move
(`nsenter --net=NS python -m services.runtime.ndp eth0`), so neighbours and switches learn
at once that the container's IPv6 addresses now answer at this port.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
import sys
from pathlib import Path

ICMPV6_NEIGHBOUR_ADVERTISEMENT = 136
FLAG_OVERRIDE = 0x20000000
OPTION_TARGET_LINK_LAYER = 2
ALL_NODES = "ff02::1"
SIOCGIFHWADDR = 0x8927


def advertisement(target: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """ICMPv6 type 136 with the Override flag and the target link-layer address option.
    The checksum is left zero: the kernel fills it in for raw ICMPv6 sockets."""
    header = struct.pack("!BBHI", ICMPV6_NEIGHBOUR_ADVERTISEMENT, 0, 0, FLAG_OVERRIDE)
    option = struct.pack("!BB6s", OPTION_TARGET_LINK_LAYER, 1, mac)
    return header + target.packed + option


def addresses(ifname: str) -> list[ipaddress.IPv6Address]:
    """The interface's IPv6 addresses, from this network namespace's /proc."""
    found = []
    for line in Path("/proc/net/if_inet6").read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == ifname:
            found.append(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return found


def hardware_address(ifname: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        info = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    return info[18:24]


def announce(ifname: str) -> list[ipaddress.IPv6Address]:
    index = socket.if_nametoindex(ifname)
    mac = hardware_address(ifname)
    targets = addresses(ifname)
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        # Neighbour discovery messages are only valid with a hop limit of 255.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sent = []
        for target in targets:
            try:
                s.sendto(advertisement(target, mac), (ALL_NODES, 0, 0, index))
            except OSError as exc:  # e.g. no usable source address yet
                print(f"{target}: {exc}", file=sys.stderr)
                continue
            sent.append(target)
    return sent


if __name__ == "__main__":
    sent = announce(sys.argv[1] if len(sys.argv) > 1 else "eth0")
    print(" ".join(str(a) for a in sent))
