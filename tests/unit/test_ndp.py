"""The neighbour advertisement Ferry sends after a move, byte by byte (RFC 4861 §4.4)."""

from __future__ import annotations

import ipaddress

from services.runtime.ndp import advertisement


def test_advertisement_layout() -> None:
    target = ipaddress.IPv6Address("fe80::fe:aff:fee3:a164")
    mac = bytes.fromhex("02fe0ae3a164")
    packet = advertisement(target, mac)
    assert packet[0] == 136 and packet[1] == 0  # type, code
    assert packet[2:4] == b"\0\0"  # checksum: the kernel computes it
    assert packet[4] == 0x20  # Override set, Router and Solicited clear
    assert packet[8:24] == target.packed
    assert packet[24:26] == bytes([2, 1])  # target link-layer address, 8 bytes
    assert packet[26:32] == mac
    assert len(packet) == 32
