"""What a host that comes back from a reboot starts again. Pure: no I/O.

A reboot wipes what lived in memory and in /run: every process, runc's state, network
namespaces, cgroups and mounts. What is on disk stays: each container's upper dir and its
volumes. The host starts again, from those files, exactly the containers the placement
positively says it runs — state `running` on this host — whose restart policy asks for it
and that runc no longer knows. Nothing else: a container placed elsewhere (whatever this
disk still holds of it), one being created or moved (its saga ends it by the evidence
rules), one runc still knows (a worker restarted, not the host), and one with nothing on
this disk to start from, are left as they are and said so.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Literal

from schemas.v1.containers import Placement


@dataclass(frozen=True)
class BootDecision:
    name: str
    action: Literal["start", "leave"]
    reason: str


def after_boot(
    placements: Iterable[Placement], host: str, runc_knows: Set[str], on_disk: Set[str]
) -> list[BootDecision]:
    """One decision per container this host holds or is placed with, by name."""
    decisions = []
    placed_here = set()
    for p in sorted(placements, key=lambda p: p.name):
        if p.host != host:
            if p.name in on_disk:
                decisions.append(
                    BootDecision(p.name, "leave", f"placed on {p.host}: its files here stay unused")
                )
            continue
        placed_here.add(p.name)
        if p.name in runc_knows:
            why = "runc still knows it (the host did not reboot)"
        elif p.state != "running":
            why = f"it is {p.state}: that ends by its own saga's rules"
        elif p.spec.restart == "no":
            why = "its restart policy is no"
        elif p.name not in on_disk:
            why = "nothing of it is on this disk to start from"
        else:
            policy = p.spec.restart
            decisions.append(BootDecision(p.name, "start", f"placed here, restart {policy}"))
            continue
        decisions.append(BootDecision(p.name, "leave", why))
    for name in sorted(on_disk - placed_here):
        if all(d.name != name for d in decisions):
            decisions.append(BootDecision(name, "leave", "no placement names it: unknown, kept"))
    return decisions
