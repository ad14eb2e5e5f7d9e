"""Which strategy moves a container: the request's wish, checked against what both hosts
can do, or — for `auto` — the best one they can, with the reason written down."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from schemas.v1.migrations import Strategy, StrategyChoice

LAZY_PAGES = "lazy_pages"
DIRTY_TRACKING = "mem_dirty_track"

# What each strategy needs from both hosts (stop-and-copy needs only a working CRIU).
NEEDS: dict[str, tuple[str, ...]] = {
    "stop-and-copy": (),
    "post-copy": (LAZY_PAGES,),
    "pre-copy": (DIRTY_TRACKING,),
}


@dataclass(frozen=True)
class HostFeatures:
    """What a host said it can do when it registered, and why not where it cannot."""

    host: str
    features: Collection[str]
    missing: dict[str, str]


class StrategyUnavailable(ValueError):
    """The requested strategy cannot run between these hosts; the message says why."""


def _lacking(strategy: str, hosts: tuple[HostFeatures, ...]) -> str | None:
    for need in NEEDS[strategy]:
        for host in hosts:
            if need not in host.features:
                why = host.missing.get(need, "not reported by the host")
                return f"{strategy} needs {need} on {host.host}: {why}"
    return None


def choose(
    requested: Strategy, downtime_budget_ms: int, source: HostFeatures, destination: HostFeatures
) -> StrategyChoice:
    hosts = (source, destination)
    if requested != "auto":
        lacking = _lacking(requested, hosts)
        if lacking:
            raise StrategyUnavailable(lacking)
        return StrategyChoice(chosen=requested, reason="requested")
    # Pre-copy keeps the full way back and converges on the budget; post-copy freezes
    # only for the small images whatever the memory size; stop-and-copy always works.
    if _lacking("pre-copy", hosts) is None:
        return StrategyChoice(
            chosen="pre-copy",
            reason=f"auto: dirty-page tracking on both hosts; rounds until the rest fits"
            f" the {downtime_budget_ms} ms downtime budget",
        )
    skipped = _lacking("pre-copy", hosts)
    if _lacking("post-copy", hosts) is None:
        return StrategyChoice(
            chosen="post-copy",
            reason=f"auto: {skipped}; lazy pages on both hosts keep the freeze independent of"
            f" memory size ({downtime_budget_ms} ms budget)",
        )
    return StrategyChoice(
        chosen="stop-and-copy",
        reason=f"auto: {skipped}; {_lacking('post-copy', hosts)}; the freeze grows with memory",
    )
