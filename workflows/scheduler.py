"""Where a container can go: every host judged against what the container asks and what the
fleet already holds, and the best host that fits chosen by the objective below. Pure: the
caller reads hosts and claims from the store.

Claims. What a host holds is the union, by container, of the claims on it (running,
incoming, reserved): a container both running and reserved there counts once, at the larger
of its claims. The asking container's own claims count nowhere: a move leaves its source,
and a retried reservation of its own must not stand in its own way.

Rules. `validate` refuses constraints that no fleet state can satisfy (ConstraintError,
naming the field). `judge` gives each host the first rule it fails, in this order: declared
dead; down; cordoned; the host the container leaves; not the host the operator named;
pinned elsewhere; zone; labels; CPU flags the process started with; anti-affinity (claims
of every kind count); memory; CPUs. Capacity holds while `used + asked <= declared`, so
exactly full still fits; a host that declares no memory or no CPUs never fails on it.

Objective: lower wins, ties go to the first host name.
  1. only with an anti-affinity group: members of the group already in the candidate's
     zone — the group spreads over zones even when its scope is host;
  2. the candidate zone's memory use after placing, as a fraction of the zone's declared
     memory — spread over zones first;
  3. the candidate host's memory use after placing, as a fraction of its capacity — then
     the least loaded host of that zone;
  4. the host's CPU use after placing, as a fraction of its CPUs (0 where none declared).
A host without declared memory counts NOMINAL_MEMORY_MIB in 2 and 3. Only hosts that are
up, not cordoned and not declared dead count in a zone for 2: capacity nobody can place on
must not make a zone look roomy. A host whose zone is "" is a zone of its own, for the
anti-affinity scope and for the objective alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Scope = Literal["zone", "host"]
ClaimKind = Literal["running", "incoming", "reserved"]

DEFAULT_MEMORY_MIB = 128  # the claim of a container without a memory limit
NOMINAL_MEMORY_MIB = 4096  # ranks a host with no declared memory (it is never "full")
FLAGS_NAMED = 5  # a verdict names this many missing CPU flags, then counts the rest
_SLACK = 1e-9  # CPU counts are floats: 0.1 + 0.2 asked must still fit 0.3 declared


@dataclass(frozen=True)
class Constraint:
    """What a container asks of its host, from its spec."""

    zone: str | None = None
    host_labels: Mapping[str, str] = field(default_factory=dict)  # all must match
    anti_affinity_group: str | None = None  # never two members of this group ...
    anti_affinity_scope: Scope = "host"  # ... on one host / in one zone
    pinned_host: str | None = None  # the only host it may run on


@dataclass(frozen=True)
class HostView:
    name: str
    zone: str  # "": not said; such a host is its own failure domain for zone scope
    labels: Mapping[str, str]
    memory_mib: int | None  # declared capacity; None: not declared
    cpus: float | None  # declared capacity; None: not declared
    up: bool  # has a heartbeat
    cordoned: bool
    declared_dead: bool = False
    cpu_flags: frozenset[str] | None = None  # None: not known


@dataclass(frozen=True)
class Claim:
    """Memory and CPUs a container holds, or will hold, on a host."""

    container: str
    host: str
    memory_mib: int
    cpus: float
    group: str | None  # its anti-affinity group, if any
    kind: ClaimKind


@dataclass(frozen=True)
class Ask:
    container: str
    memory_mib: int | None  # None: no limit, claims DEFAULT_MEMORY_MIB
    cpus: float | None  # None: claims 0
    constraint: Constraint
    leaving: str | None = None  # a move: the host it runs on now; never chosen
    only: str | None = None  # the operator named the host: judge that one alone
    cpu_flags: frozenset[str] | None = None  # the source host's flags; None: new or unknown


@dataclass(frozen=True)
class Verdict:
    host: str
    fits: bool
    reason: str  # the first failing rule, or a one-line summary of the score
    score: tuple[float, ...] | None  # None when it does not fit; lower is better


@dataclass(frozen=True)
class Choice:
    host: str
    reasons: tuple[str, ...]  # the objective's terms, against the runner-up if there is one
    verdicts: tuple[Verdict, ...]  # every host judged, by name


class ConstraintError(ValueError):
    """Constraints that no fleet state can satisfy: bad input, not a full fleet."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NoHostFits(ValueError):
    """Valid constraints, but no host fits now; the message gives each host's reason."""

    def __init__(self, verdicts: tuple[Verdict, ...]) -> None:
        lines = "; ".join(f"{v.host}: {v.reason}" for v in verdicts)
        super().__init__(f"no host fits: {lines or 'the fleet has no hosts'}")
        self.verdicts = verdicts


Domain = tuple[str, str]  # ("zone", name), or ("host", name) for a host without a zone


@dataclass(frozen=True)
class _Rank:
    host: HostView
    domain: Domain
    members: int | None  # None: the ask has no group
    zone: float
    memory: float
    cpus: float

    @property
    def score(self) -> tuple[float, ...]:
        head = () if self.members is None else (float(self.members),)
        return (*head, self.zone, self.memory, self.cpus)


def used_on(
    host: str, claims: Sequence[Claim], *, excluding: str | None = None
) -> tuple[int, float]:
    """Memory MiB and CPUs held on `host`: once per container, at the larger of its claims."""
    held: dict[str, tuple[int, float]] = {}
    for c in claims:
        if c.host == host and c.container != excluding:
            memory, cpus = held.get(c.container, (0, 0.0))
            held[c.container] = (max(memory, c.memory_mib), max(cpus, c.cpus))
    # fsum: the same total whatever order the claims came in.
    return sum(m for m, _ in held.values()), math.fsum(p for _, p in held.values())


def _asked(ask: Ask) -> tuple[int, float]:
    memory = DEFAULT_MEMORY_MIB if ask.memory_mib is None else ask.memory_mib
    return memory, 0.0 if ask.cpus is None else ask.cpus


def _domain(host: HostView) -> Domain:
    return ("zone", host.zone) if host.zone else ("host", host.name)


def _domain_of(name: str, by_name: Mapping[str, HostView]) -> Domain:
    # A claim on a host the fleet no longer lists has no zone we know: its own domain.
    return _domain(by_name[name]) if name in by_name else ("host", name)


def _where(domain: Domain) -> str:
    return f"zone {domain[1]}" if domain[0] == "zone" else f"{domain[1]} (no zone)"


def _fraction(used: float, capacity: float) -> float:
    if capacity > 0:
        return used / capacity
    return 0.0 if used <= 0 else math.inf


def _misfit(con: Constraint, host: HostView) -> str | None:
    """Why `host` can never satisfy the static constraints (zone, labels), or None."""
    if con.zone is not None and host.zone != con.zone:
        return f"in {_where(_domain(host))}, not zone {con.zone}"
    lacking = [f"{k}={v}" for k, v in sorted(con.host_labels.items()) if host.labels.get(k) != v]
    return f"lacks label {', '.join(lacking)}" if lacking else None


def validate(ask: Ask, hosts: Sequence[HostView]) -> None:
    con = ask.constraint
    by_name = {h.name: h for h in hosts}
    known = ", ".join(sorted(by_name)) or "none"
    zones = sorted({h.zone for h in hosts if h.zone})
    if con.zone is not None and con.zone not in zones:
        said = ", ".join(zones) or "none"
        raise ConstraintError("zone", f"no host is in zone {con.zone!r} (zones: {said})")
    for key, value in sorted(con.host_labels.items()):
        if not any(h.labels.get(key) == value for h in hosts):
            have = sorted({h.labels[key] for h in hosts if key in h.labels})
            said = f"{key} on hosts: {', '.join(have)}" if have else f"no host has a {key} label"
            raise ConstraintError("host_labels", f"no host has label {key}={value} ({said})")
    pinned = con.pinned_host
    if pinned is not None:
        if pinned not in by_name:
            raise ConstraintError("pinned_host", f"pinned to unknown host {pinned!r} ({known})")
        why = _misfit(con, by_name[pinned])
        if why:
            raise ConstraintError("constraints", f"pinned to {pinned} ({why})")
        if ask.leaving is not None:
            raise ConstraintError("pinned_host", f"pinned to {pinned}: it cannot move")
    if ask.only is not None:
        if pinned is not None and ask.only != pinned:
            raise ConstraintError("host", f"pinned to {pinned}")
        if ask.only not in by_name:
            raise ConstraintError("host", f"no host named {ask.only!r} (hosts: {known})")
        if ask.only == ask.leaving:
            raise ConstraintError("host", f"it already runs on {ask.only}")
        why = _misfit(con, by_name[ask.only])
        if why:
            raise ConstraintError("host", f"{ask.only}: {why}")
    if (con.zone or con.host_labels) and all(_misfit(con, h) for h in hosts):
        # Each constraint alone is met somewhere (checked above), never all on one host.
        where = f" in zone {con.zone}" if con.zone is not None else ""
        labels = ", ".join(f"{k}={v}" for k, v in sorted(con.host_labels.items()))
        raise ConstraintError("constraints", f"no host{where} has label {labels}")


def _conflict(
    ask: Ask, host: HostView, claims: Sequence[Claim], by_name: Mapping[str, HostView]
) -> str | None:
    group = ask.constraint.anti_affinity_group
    if group is None:
        return None
    by_zone = ask.constraint.anti_affinity_scope == "zone"
    for c in sorted(claims, key=lambda c: (c.container, c.host)):
        if c.group != group or c.container == ask.container:
            continue
        member = f"anti-affinity: {c.container} of group {group} is {c.kind}"
        if c.host == host.name:
            return f"{member} on it"
        if by_zone and _domain_of(c.host, by_name) == _domain(host):
            return f"{member} on {c.host}, in {_where(_domain(host))}"
    return None


def _rule(
    ask: Ask, host: HostView, claims: Sequence[Claim], by_name: Mapping[str, HostView]
) -> str | None:
    """The first rule `host` fails, or None when it fits."""
    con = ask.constraint
    if host.declared_dead:
        return "declared dead"
    if not host.up:
        return "down: no heartbeat"
    if host.cordoned:
        return "cordoned"
    if host.name == ask.leaving:
        return "the host it leaves"
    if ask.only is not None and host.name != ask.only:
        return f"not the host named ({ask.only})"
    if con.pinned_host is not None and host.name != con.pinned_host:
        return f"pinned to {con.pinned_host}"
    why = _misfit(con, host)
    if why:
        return why
    if ask.cpu_flags is not None and host.cpu_flags is not None:
        # The restored process keeps using the instructions it found at start.
        missing = sorted(ask.cpu_flags - host.cpu_flags)
        if missing:
            more = ", ..." if len(missing) > FLAGS_NAMED else ""
            named = ", ".join(missing[:FLAGS_NAMED]) + more
            return f"lacks {len(missing)} CPU flag(s) the process started with: {named}"
    conflict = _conflict(ask, host, claims, by_name)
    if conflict:
        return conflict
    used_memory, used_cpus = used_on(host.name, claims, excluding=ask.container)
    memory, cpus = _asked(ask)
    if host.memory_mib is not None and used_memory + memory > host.memory_mib:
        return (
            f"memory: {used_memory} MiB used and reserved + {memory} asked"
            f" > {host.memory_mib} declared"
        )
    if host.cpus is not None and cpus > 0 and used_cpus + cpus > host.cpus + _SLACK:
        return f"cpus: {used_cpus:g} used and reserved + {cpus:g} asked > {host.cpus:g} declared"
    return None


def _capacity(host: HostView) -> int:
    return NOMINAL_MEMORY_MIB if host.memory_mib is None else host.memory_mib


def _rank(
    ask: Ask, host: HostView, by_name: Mapping[str, HostView], claims: Sequence[Claim]
) -> _Rank:
    memory, cpus = _asked(ask)
    domain, group = _domain(host), ask.constraint.anti_affinity_group
    members = {
        c.container
        for c in claims
        if c.group == group
        and c.container != ask.container
        and _domain_of(c.host, by_name) == domain
    }
    zone = [
        h
        for h in by_name.values()
        if _domain(h) == domain and h.up and not h.cordoned and not h.declared_dead
    ]
    zone_used = sum(used_on(h.name, claims, excluding=ask.container)[0] for h in zone)
    used_memory, used_cpus = used_on(host.name, claims, excluding=ask.container)
    return _Rank(
        host=host,
        domain=domain,
        members=None if group is None else len(members),
        zone=_fraction(zone_used + memory, sum(_capacity(h) for h in zone)),
        memory=_fraction(used_memory + memory, _capacity(host)),
        cpus=0.0 if host.cpus is None else _fraction(used_cpus + cpus, host.cpus),
    )


def _summary(r: _Rank) -> str:
    head = "" if r.members is None else f"{r.members} of its group in the zone, "
    return (
        f"fits: {head}{_where(r.domain)} {r.zone:.0%} of memory used after,"
        f" host {r.memory:.0%}, CPUs {r.cpus:.0%}"
    )


def _judge(
    ask: Ask, hosts: Sequence[HostView], claims: Sequence[Claim]
) -> tuple[tuple[Verdict, ...], list[_Rank]]:
    by_name = {h.name: h for h in hosts}
    verdicts, ranks = [], []
    for host in sorted(hosts, key=lambda h: h.name):
        why = _rule(ask, host, claims, by_name)
        if why is not None:
            verdicts.append(Verdict(host.name, False, why, None))
            continue
        rank = _rank(ask, host, by_name, claims)
        ranks.append(rank)
        verdicts.append(Verdict(host.name, True, _summary(rank), rank.score))
    ranks.sort(key=lambda r: (r.score, r.host.name))
    return tuple(verdicts), ranks


def judge(ask: Ask, hosts: Sequence[HostView], claims: Sequence[Claim]) -> tuple[Verdict, ...]:
    """One verdict per host, by name: the first rule it fails, or its score."""
    return _judge(ask, hosts, claims)[0]


def _reasons(ask: Ask, ranks: list[_Rank]) -> tuple[str, ...]:
    best, runner = ranks[0], (ranks[1] if len(ranks) > 1 else None)
    name = best.host.name
    lines = []
    terms = ["zone memory", "host memory", "host CPUs"]
    # Zone terms are worth comparing only with a candidate of another zone.
    other = next((r for r in ranks[1:] if r.domain != best.domain), None)
    if best.members is not None:
        terms.insert(0, "group members in the zone")
        vs = f" ({_where(other.domain)}: {other.members})" if other else ""
        group = ask.constraint.anti_affinity_group
        lines.append(f"group {group}: {best.members} in {_where(best.domain)}{vs}")
    vs = f" ({_where(other.domain)} {other.zone:.0%})" if other else ""
    lines.append(f"{_where(best.domain)} {best.zone:.0%} of memory used after{vs}")
    vs = f" ({runner.host.name} {runner.memory:.0%})" if runner else ""
    lines.append(f"{name} {best.memory:.0%} used after{vs}")
    cpus = (
        f"{best.cpus:.0%} of CPUs used after" if best.host.cpus is not None else "no CPUs declared"
    )
    vs = f" ({runner.host.name} {runner.cpus:.0%})" if runner else ""
    lines.append(f"{name} {cpus}{vs}")
    if runner is None:
        lines.append("the only host that fits")
    else:
        decided = [t for t, a, b in zip(terms, best.score, runner.score, strict=True) if a != b]
        lines.append(
            f"chosen over {runner.host.name} by {decided[0]}"
            if decided
            else f"ties with {runner.host.name} on every term: the name decides"
        )
    return tuple(lines)


def choose(ask: Ask, hosts: Sequence[HostView], claims: Sequence[Claim]) -> Choice:
    """The best host that fits, with why; ConstraintError or NoHostFits when there is none."""
    validate(ask, hosts)
    verdicts, ranks = _judge(ask, hosts, claims)
    if not ranks:
        raise NoHostFits(verdicts)
    return Choice(ranks[0].host.name, _reasons(ask, ranks), verdicts)
