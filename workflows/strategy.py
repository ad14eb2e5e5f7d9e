"""Which strategy moves a container: the request's wish, checked against what both hosts
can do, or — for `auto` — the best one they can, with the reason written down."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from schemas.v1.migrations import Strategy, StrategyChoice
from schemas.v2.forecast import FreezeForecast

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


class OverBudget(StrategyUnavailable):
    """Every strategy that could run would freeze the container longer than the budget."""


# auto's order of preference: pre-copy keeps the whole way back, post-copy's freeze does
# not grow with memory, stop-and-copy always works.
PREFERENCE = ("pre-copy", "post-copy", "stop-and-copy")
Forecaster = Callable[[str], FreezeForecast]
GUIDE_MS = 300  # pre-copy's rounds aim here when the request gives no budget (QEMU's default)


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


def choose_within_budget(
    requested: Strategy,
    budget_ms: int | None,
    source: HostFeatures,
    destination: HostFeatures,
    forecaster: Forecaster,
) -> tuple[StrategyChoice, FreezeForecast]:
    """The strategy, and its freeze forecast. With a budget, a strategy whose forecast is
    over it is refused when requested, and passed over by auto for the next one that fits;
    without one, the forecast is only recorded."""
    hosts = (source, destination)
    guide_ms = budget_ms or GUIDE_MS
    if requested != "auto":
        choice = choose(requested, guide_ms, source, destination)
        predicted = forecaster(choice.chosen)
        if not predicted.fits:
            raise OverBudget(f"over the {budget_ms} ms downtime budget: {predicted.line()}")
        return choice, predicted
    usable = [s for s in PREFERENCE if _lacking(s, hosts) is None]
    forecasts = {s: forecaster(s) for s in usable}
    preferred = choose("auto", guide_ms, source, destination)
    fitting = [s for s in usable if forecasts[s].fits]
    if not fitting:
        lines = "; ".join(forecasts[s].line() for s in usable)
        raise OverBudget(f"no strategy fits the {budget_ms} ms downtime budget: {lines}")
    if fitting[0] == preferred.chosen:
        return preferred, forecasts[preferred.chosen]
    chosen = fitting[0]
    before = usable[: usable.index(chosen)]
    passed = ", ".join(f"{s} {forecasts[s].predicted_ms} ms" for s in before)
    return (
        StrategyChoice(
            chosen=chosen,
            reason=f"auto: forecast {forecasts[chosen].predicted_ms} ms fits the {budget_ms} ms"
            f" budget; passed over: {passed}",
        ),
        forecasts[chosen],
    )
