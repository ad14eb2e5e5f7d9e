"""Holding a container's network closed while it is restored, and opening it after the commit.

Ferry's own chain FERRY-HOLD drops everything but loopback and CRIU's own marked packets.
CRIU removes only a chain named CRIU when it finishes a restore, so the hold survives the
restore and no client reaches the destination before the placement has moved.
"""

from __future__ import annotations

from pathlib import Path

from services.runtime.proc import arun

HOLD_CHAIN = "FERRY-HOLD"
CRIU_CHAIN = "CRIU"
CRIU_MARK = "0xC114"
TOOLS = ("iptables", "ip6tables")


def _in(netns: Path, tool: str) -> list[str]:
    return ["nsenter", f"--net={netns}", tool, "-w"]


async def hold(netns: Path) -> None:
    """Drop all traffic except loopback and CRIU's marked packets; idempotent."""
    for tool in TOOLS:
        ipt = _in(netns, tool)
        exists = await arun([*ipt, "-n", "-L", HOLD_CHAIN], check=False)
        if exists.returncode != 0:
            await arun([*ipt, "-N", HOLD_CHAIN])
            await arun([*ipt, "-A", HOLD_CHAIN, "-i", "lo", "-j", "ACCEPT"])
            await arun([*ipt, "-A", HOLD_CHAIN, "-o", "lo", "-j", "ACCEPT"])
            await arun([*ipt, "-A", HOLD_CHAIN, "-m", "mark", "--mark", CRIU_MARK, "-j", "ACCEPT"])
            await arun([*ipt, "-A", HOLD_CHAIN, "-j", "DROP"])
        for hook in ("INPUT", "OUTPUT"):
            hooked = await arun([*ipt, "-C", hook, "-j", HOLD_CHAIN], check=False)
            if hooked.returncode != 0:
                await arun([*ipt, "-I", hook, "1", "-j", HOLD_CHAIN])


async def _remove_chain(netns: Path, chain: str) -> None:
    for tool in TOOLS:
        ipt = _in(netns, tool)
        for hook in ("INPUT", "OUTPUT"):
            while (await arun([*ipt, "-D", hook, "-j", chain], check=False)).returncode == 0:
                pass
        await arun([*ipt, "-F", chain], check=False)
        await arun([*ipt, "-X", chain], check=False)


async def release(netns: Path) -> None:
    """Open the network again; harmless when it was not held."""
    await _remove_chain(netns, HOLD_CHAIN)


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
