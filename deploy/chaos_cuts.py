"""Network cuts for `make chaos`, each proven by the packets its rules dropped.

A cut is a set of iptables DROP rules in one host's network namespace, tagged with a
comment; their counters are read before the rules go, so a cut that dropped nothing is
reported as such (it did not fire) instead of being taken for a partition.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

TAG = "ferry-chaos"


@dataclass(frozen=True)
class Cut:
    """Where to cut: one host's namespace, from its peer and/or from NATS."""

    netns: str  # /run/netns/<lab>-<host>
    peer: str = ""  # the other host's address; "" leaves host-to-host traffic alone
    nats: tuple[tuple[str, int], ...] = ()  # every NATS node's address and port; () spares the bus

    def rules(self) -> list[list[str]]:
        drop = ["-m", "comment", "--comment", TAG, "-j", "DROP"]
        rules = []
        if self.peer:
            rules += [["INPUT", "-s", self.peer, *drop], ["OUTPUT", "-d", self.peer, *drop]]
        for address, number in self.nats:
            port = str(number)
            rules += [
                ["INPUT", "-p", "tcp", "-s", address, "--sport", port, *drop],
                ["OUTPUT", "-p", "tcp", "-d", address, "--dport", port, *drop],
            ]
        return rules

    def iptables(self, *args: str, check: bool = True) -> str:
        argv = ["nsenter", f"--net={self.netns}", "iptables", "-w", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=check).stdout


def counters(cut: Cut, tag: str = TAG) -> int:
    """Packets the tagged rules of both chains matched so far."""
    total = 0
    for chain in ("INPUT", "OUTPUT"):
        for line in cut.iptables("-L", chain, "-v", "-x", "-n", check=False).splitlines():
            if f"/* {tag} */" in line:
                total += int(line.split()[0])
    return total


def hold(cut: Cut, at_least: float, at_most: float) -> tuple[int, float]:
    """Cut for `at_least` seconds, longer (up to `at_most`) while nothing was dropped yet:
    a step that sends nothing at first still gets its traffic cut once it does. Returns
    the packets dropped and how long the cut lasted."""
    rules = cut.rules()
    started = time.monotonic()
    for rule in rules:
        cut.iptables("-I", *rule)
    try:
        while True:
            lasted = time.monotonic() - started
            if lasted >= at_most or (lasted >= at_least and counters(cut) > 0):
                break
            time.sleep(0.25)
        return counters(cut), round(time.monotonic() - started, 1)
    finally:
        for rule in rules:
            cut.iptables("-D", *rule, check=False)
