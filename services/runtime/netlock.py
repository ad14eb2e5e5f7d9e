"""Holding a container's network closed while it is restored, and opening it after the commit.

Ferry's own chain FERRY-HOLD queues everything but loopback and CRIU's own marked packets
to NFQUEUE (no --queue-bypass): the packet holder (services/runtime/packet_hold.py) keeps
them waiting and lets them through in order after the commit, and with no holder bound the
kernel drops them — never lets them pass. Ferry's dumps run with `network-lock skip` (the
source's link is down first) and CRIU restores with the method its dump recorded, so this
is the only lock there, and no client reaches the destination before the placement has
moved.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime.packet_hold import QUEUE_NUM
from services.runtime.proc import arun

HOLD_CHAIN = "FERRY-HOLD"
CRIU_CHAIN = "CRIU"
CRIU_MARK = "0xC114"
TOOLS = ("iptables", "ip6tables")


def _in(netns: Path, tool: str) -> list[str]:
    return ["nsenter", f"--net={netns}", tool, "-w"]


HOLD_RULES = f"""*filter
:{HOLD_CHAIN} - [0:0]
-A {HOLD_CHAIN} -i lo -j ACCEPT
-A {HOLD_CHAIN} -o lo -j ACCEPT
-A {HOLD_CHAIN} -m mark --mark {CRIU_MARK} -j ACCEPT
-A {HOLD_CHAIN} -j NFQUEUE --queue-num {QUEUE_NUM}
-I INPUT 1 -j {HOLD_CHAIN}
-I OUTPUT 1 -j {HOLD_CHAIN}
COMMIT
"""
RELEASE_RULES = f"""*filter
-D INPUT -j {HOLD_CHAIN}
-D OUTPUT -j {HOLD_CHAIN}
-F {HOLD_CHAIN}
-X {HOLD_CHAIN}
COMMIT
"""


async def _restore_rules(netns: Path, tool: str, rules: str) -> bool:
    """Apply a rule set in one atomic iptables-restore (one process, not one per rule)."""
    with tempfile.NamedTemporaryFile("w", prefix="ferry-rules-", suffix=".txt") as f:
        f.write(rules)
        f.flush()
        done = await arun(
            ["nsenter", f"--net={netns}", f"{tool}-restore", "-w", "--noflush", f.name],
            check=False,
        )
    return done.returncode == 0


async def _hold_one(netns: Path, tool: str) -> None:
    if f"-j {HOLD_CHAIN}" in (await arun([*_in(netns, tool), "-S", "INPUT"], check=False)).stdout:
        return  # held already (a redelivered command)
    if not await _restore_rules(netns, tool, HOLD_RULES):
        raise RuntimeFailure(f"{tool}: cannot install the {HOLD_CHAIN} chain in {netns}")


async def hold(netns: Path) -> None:
    """Queue all traffic but loopback and CRIU's marked packets (held by the packet
    holder if one is bound, dropped if not); idempotent."""
    await asyncio.gather(*(_hold_one(netns, tool) for tool in TOOLS))


async def _remove_chain_with(netns: Path, tool: str, chain: str) -> None:
    ipt = _in(netns, tool)
    for hook in ("INPUT", "OUTPUT"):
        while (await arun([*ipt, "-D", hook, "-j", chain], check=False)).returncode == 0:
            pass
    await arun([*ipt, "-F", chain], check=False)
    await arun([*ipt, "-X", chain], check=False)


async def _remove_chain(netns: Path, chain: str) -> None:
    for tool in TOOLS:
        await _remove_chain_with(netns, tool, chain)


async def _release_one(netns: Path, tool: str) -> None:
    if not await _restore_rules(netns, tool, RELEASE_RULES):
        await _remove_chain_with(netns, tool, HOLD_CHAIN)  # not held, or held twice


async def release(netns: Path) -> None:
    """Open the network again (IPv4 and IPv6 at once); harmless when it was not held."""
    await asyncio.gather(*(_release_one(netns, tool) for tool in TOOLS))


async def remove_criu_lock(netns: Path) -> None:
    """CRIU's own lock chain, left behind in a source netns by a dump (or a killed CRIU)."""
    await _remove_chain(netns, CRIU_CHAIN)


async def is_held(netns: Path) -> bool:
    listed = await arun([*_in(netns, "iptables"), "-S", "INPUT"], check=False)
    return f"-j {HOLD_CHAIN}" in listed.stdout


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process's network namespace listens on (from /proc, no tools needed)."""
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
