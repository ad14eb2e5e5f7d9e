"""A container's own network namespace: a file on its host, a veth into the host's bridge."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import ipaddress
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from services.runtime.proc import arun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContainerNetwork:
    """Everything that identifies a container on the datacenter network."""

    netns_path: Path
    host_veth: str
    ip: str
    prefix_len: int
    gateway: str
    mac: str


def mac_for(ip: str) -> str:
    """A stable, locally administered MAC derived from the IPv4 address."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:fe:" + ":".join(f"{b:02x}" for b in octets)


def host_veth_name(container: str) -> str:
    """Interface names are capped at 15 bytes; a digest keeps them unique and short."""
    return "vf" + hashlib.sha256(container.encode()).hexdigest()[:10]


async def create(net: ContainerNetwork, bridge: str, *, link_up: bool = True) -> None:
    """Make the namespace file, plug its eth0 into `bridge`, give it the address and route.

    With `link_up=False` the host's end stays down: an incoming container's MAC must not
    appear on the bridge while the source still answers for it.
    """
    net.netns_path.parent.mkdir(parents=True, exist_ok=True)
    net.netns_path.touch(exist_ok=True)
    if not os.path.ismount(net.netns_path):
        await arun(["unshare", f"--net={net.netns_path}", "true"])
    ns = ["nsenter", f"--net={net.netns_path}"]
    await arun(
        [
            "ip",
            "link",
            "add",
            net.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            str(net.netns_path),
        ]
    )
    await arun(["ip", "link", "set", net.host_veth, "master", bridge])
    if link_up:
        await arun(["ip", "link", "set", net.host_veth, "up"])
    await arun([*ns, "ip", "link", "set", "lo", "up"])
    await arun([*ns, "ip", "link", "set", "eth0", "address", net.mac])
    # The same MAC, hence the same IPv6 link-local address, exists on two hosts during a
    # move by design: skip duplicate address detection, which would also hold the address
    # tentative (unusable as a source) for a second after every move.
    await arun([*ns, "sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"], check=False)
    if not link_up:
        await set_answering(net.netns_path, answering=False)
    await arun([*ns, "ip", "addr", "add", f"{net.ip}/{net.prefix_len}", "dev", "eth0"])
    await arun([*ns, "ip", "link", "set", "eth0", "up"])
    await arun([*ns, "ip", "route", "add", "default", "via", net.gateway])


async def set_link(container: str, *, up: bool, check: bool = False) -> None:
    """Plug the container's host-side veth into its bridge (up) or take it off (down).

    Down is how a host stops answering for the container's MAC while the other host
    takes it over; up (on the destination) only once its netns is held closed.
    """
    state = "up" if up else "down"
    await arun(["ip", "link", "set", host_veth_name(container), state], check=check)


async def set_answering(netns_path: Path, *, answering: bool) -> None:
    """Whether the container's kernel answers ARP requests for its address.

    An incoming container's netns stays silent until its network opens: every frame it sent
    would pull the bridges' forwarding tables to it, and after a rollback the source answers
    for the same IP and MAC again. (Everything else it would send is held by the hold's
    OUTPUT rule; ARP is not IP, so iptables never sees it.)"""
    value = "0" if answering else "8"  # 8: reply to no ARP request at all
    setting = f"net.ipv4.conf.eth0.arp_ignore={value}"
    await arun(["nsenter", f"--net={netns_path}", "sysctl", "-qw", setting])


async def gratuitous_arp(netns_path: Path, ip: str) -> bool:
    """One gratuitous ARP from the container's eth0: the bridges learn where its MAC is now.
    Sent from a packet socket, so it goes out even while the netns is held and silent."""
    garp = ["busybox", "arping", "-U", "-c", "1", "-I", "eth0", ip]
    return (await arun(["nsenter", f"--net={netns_path}", *garp], check=False)).returncode == 0


def free_port(address: str) -> int:
    """A TCP port nobody listens on at `address` now (for a CRIU server about to start)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


async def announce(netns_path: Path, ip: str) -> list[str]:
    """Tell neighbours where the container's MAC lives now: a gratuitous ARP for its IPv4
    address, unsolicited neighbour advertisements for its IPv6 ones. Returns what was
    announced."""
    inside = ["nsenter", f"--net={netns_path}"]
    announced = [ip] if await gratuitous_arp(netns_path, ip) else []
    ndp = await arun([*inside, sys.executable, "-m", "services.runtime.ndp", "eth0"], check=False)
    if ndp.returncode == 0:
        announced += ndp.stdout.split()
    else:
        log.warning("IPv6 neighbour advertisement failed: %s", ndp.stderr.strip())
    return announced


async def destroy(netns_path: Path, host_veth: str) -> None:
    """Remove the veth and the namespace; safe to call on a half-made or absent network."""
    await arun(["ip", "link", "del", host_veth], check=False)
    if os.path.ismount(netns_path):
        await arun(["umount", str(netns_path)], check=False)
    netns_path.unlink(missing_ok=True)


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _connect_from(netns_path: Path, ip: str, port: int, timeout: float) -> None:
    """Runs on a thread of its own: setns(2) moves only the calling thread, which then
    ends, so nothing else in the worker ever runs in the container's namespace."""
    fd = os.open(netns_path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns_path}: {os.strerror(err)}")
    finally:
        os.close(fd)
    socket.create_connection((ip, port), timeout).close()


async def connects_from_inside(netns_path: Path, ip: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ip:port succeeds from inside the namespace — without
    starting a process (a few ms, not tens: this runs inside the freeze window)."""
    failure: list[OSError] = []

    def attempt() -> None:
        try:
            _connect_from(netns_path, ip, port, timeout)
        except OSError as exc:
            failure.append(exc)

    thread = threading.Thread(target=attempt, name="ferry-netns-probe", daemon=True)
    thread.start()
    await asyncio.to_thread(thread.join, timeout + 1)
    return not failure and not thread.is_alive()
