"""Where a container can go: known answers on small fleets, refused constraints, and
properties checked against a checker and an objective written here, apart from the module's
own rule code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflows.scheduler import (
    DEFAULT_MEMORY_MIB,
    NOMINAL_MEMORY_MIB,
    Ask,
    Claim,
    ClaimKind,
    Constraint,
    ConstraintError,
    HostView,
    NoHostFits,
    Scope,
    Verdict,
    choose,
    judge,
    used_on,
    validate,
)


def host(
    name: str,
    zone: str = "a",
    memory: int | None = 4096,
    cpus: float | None = 4.0,
    labels: Mapping[str, str] | None = None,
    *,
    up: bool = True,
    cordoned: bool = False,
    dead: bool = False,
    flags: frozenset[str] | None = None,
) -> HostView:
    return HostView(name, zone, labels or {}, memory, cpus, up, cordoned, dead, flags)


def claim(
    container: str,
    on: str,
    memory: int,
    cpus: float = 0.0,
    group: str | None = None,
    kind: ClaimKind = "running",
) -> Claim:
    return Claim(container, on, memory, cpus, group, kind)


def ask(
    memory: int | None = 256,
    cpus: float | None = None,
    container: str = "new",
    *,
    leaving: str | None = None,
    only: str | None = None,
    flags: frozenset[str] | None = None,
    zone: str | None = None,
    host_labels: Mapping[str, str] | None = None,
    anti_affinity_group: str | None = None,
    anti_affinity_scope: Scope = "host",
    pinned_host: str | None = None,
) -> Ask:
    constraint = Constraint(
        zone, host_labels or {}, anti_affinity_group, anti_affinity_scope, pinned_host
    )
    return Ask(container, memory, cpus, constraint, leaving, only, flags)


def reasons_of(verdicts: Sequence[Verdict]) -> dict[str, str]:
    return {v.host: v.reason for v in verdicts}


# -- known answers -------------------------------------------------------------------------

# Zone a is big and a third used; zone b is small and over half used, though b1 is empty.
TWO_ZONES = [
    host("a1", "a", 8192),
    host("a2", "a", 8192),
    host("b1", "b", 2048),
    host("b2", "b", 2048),
]
LOADS = [claim("x1", "a1", 4096), claim("x2", "a2", 2048), claim("x3", "b2", 2048)]


def test_a_container_goes_to_the_emptier_zone_then_to_its_least_loaded_host() -> None:
    choice = choose(ask(256), TWO_ZONES, LOADS)
    # b1 alone is emptier (13% after) than a2 (28%), but zone b is fuller than zone a.
    assert choice.host == "a2"
    assert "zone a 39% of memory used after (zone b 56%)" in choice.reasons
    assert "a2 28% used after (a1 53%)" in choice.reasons
    assert choice.reasons[-1] == "chosen over a1 by host memory"
    assert [v.host for v in choice.verdicts] == ["a1", "a2", "b1", "b2"]
    assert reasons_of(choice.verdicts)["b2"].startswith("memory: 2048 MiB used and reserved")


def test_placing_one_by_one_fills_zones_evenly() -> None:
    fleet = [host("a1", "a", 2048), host("a2", "a", 2048), host("b1", "b", 2048)]
    claims: list[Claim] = []
    for i in range(6):
        chosen = choose(ask(512, container=f"c{i}"), fleet, claims).host
        claims.append(claim(f"c{i}", chosen, 512, kind="reserved"))
    assert [c.host for c in claims] == ["a1", "a2", "b1", "a1", "a2", "b1"]


def test_a_group_with_zone_scope_lands_in_the_zone_without_a_member() -> None:
    fleet = [host("a1", "a"), host("a2", "a"), host("b1", "b")]
    claims = [claim("m1", "a1", 256, group="g"), claim("x", "b1", 3000)]
    choice = choose(ask(256, anti_affinity_group="g", anti_affinity_scope="zone"), fleet, claims)
    assert choice.host == "b1"  # the fuller zone, but the only one without a member
    reasons = reasons_of(choice.verdicts)
    assert reasons["a1"] == "anti-affinity: m1 of group g is running on it"
    assert reasons["a2"] == "anti-affinity: m1 of group g is running on a1, in zone a"


def test_a_group_with_host_scope_avoids_hosts_with_a_member_and_spreads_over_zones() -> None:
    fleet = [host("a1", "a"), host("a2", "a"), host("b1", "b")]
    claims = [claim("m1", "a1", 256, group="g", kind="incoming"), claim("x", "b1", 3000)]
    choice = choose(ask(256, anti_affinity_group="g"), fleet, claims)
    assert choice.host == "b1"  # a2 may take it, but zone b has no member yet
    assert "group g: 0 in zone b (zone a: 1)" in choice.reasons
    assert choice.reasons[-1] == "chosen over a2 by group members in the zone"
    reasons = reasons_of(choice.verdicts)
    assert reasons["a1"] == "anti-affinity: m1 of group g is incoming on it"
    assert choice.verdicts[1].fits  # a2: only the host is ruled out
    # With b1 gone the group still may share zone a, on another host.
    assert choose(ask(256, anti_affinity_group="g"), fleet[:2], claims).host == "a2"


def test_hosts_without_a_zone_are_each_their_own_failure_domain() -> None:
    fleet = [host("n1", ""), host("n2", "")]
    claims = [claim("m1", "n1", 256, group="g")]
    choice = choose(ask(256, anti_affinity_group="g", anti_affinity_scope="zone"), fleet, claims)
    assert choice.host == "n2"
    assert reasons_of(choice.verdicts)["n1"] == "anti-affinity: m1 of group g is running on it"


def test_a_move_is_not_its_own_group_member() -> None:
    fleet = [host("a1", "a"), host("a2", "a"), host("b1", "b")]
    claims = [claim("me", "a1", 256, group="g"), claim("x", "b1", 3000)]
    a = ask(256, container="me", leaving="a1", anti_affinity_group="g", anti_affinity_scope="zone")
    choice = choose(a, fleet, claims)
    assert choice.host == "a2"  # its own claim in zone a neither blocks nor counts there
    assert "group g: 0 in zone a (zone b: 0)" in choice.reasons


def test_cordoned_down_and_dead_hosts_are_never_chosen() -> None:
    fleet = [
        host("h1", memory=8192),
        host("h2", cordoned=True),
        host("h3", up=False),
        host("h4", dead=True),
    ]
    claims = [claim("x", "h1", 7000)]
    choice = choose(ask(256), fleet, claims)
    assert choice.host == "h1"
    assert reasons_of(choice.verdicts) == {
        "h1": reasons_of(choice.verdicts)["h1"],
        "h2": "cordoned",
        "h3": "down: no heartbeat",
        "h4": "declared dead",
    }
    assert "the only host that fits" in choice.reasons


def test_a_cordoned_host_does_not_make_its_zone_look_roomy() -> None:
    fleet = [host("a1", "a"), host("a2", "a", cordoned=True), host("b1", "b")]
    claims = [claim("x", "a1", 3000), claim("y", "b1", 2000)]
    # Counting a2's empty 4 GiB, zone a would be 40% used after, less than zone b's 55%.
    assert choose(ask(256), fleet, claims).host == "b1"


def test_only_judges_the_named_host_alone_and_reports_its_failure() -> None:
    fleet = [host("h1"), host("h2")]
    claims = [claim("x", "h2", 3000)]
    choice = choose(ask(256, only="h2"), fleet, claims)
    assert choice.host == "h2"
    assert reasons_of(choice.verdicts)["h1"] == "not the host named (h2)"
    with pytest.raises(NoHostFits) as refused:
        choose(ask(2048, only="h2"), fleet, claims)
    assert "h2: memory: 3000 MiB used and reserved + 2048 asked > 4096 declared" in str(
        refused.value
    )


def test_the_host_a_move_leaves_is_never_chosen_and_its_own_claims_never_count() -> None:
    fleet = [host("h1", memory=1024), host("h2", memory=1024)]
    # It runs on h1 and a retry already reserved h2 for it: neither counts against it.
    claims = [claim("me", "h1", 1024), claim("me", "h2", 1024, kind="reserved")]
    choice = choose(ask(1024, container="me", leaving="h1"), fleet, claims)
    assert choice.host == "h2"
    assert reasons_of(choice.verdicts)["h1"] == "the host it leaves"


def test_memory_exactly_full_fits_and_one_mib_over_does_not() -> None:
    fleet = [host("h1", memory=1024)]
    claims = [claim("x", "h1", 512), claim("y", "h1", 256, kind="incoming")]
    assert choose(ask(256), fleet, claims).host == "h1"
    [verdict] = judge(ask(257), fleet, claims)
    assert not verdict.fits and verdict.score is None
    assert verdict.reason == "memory: 768 MiB used and reserved + 257 asked > 1024 declared"


def test_a_container_without_a_memory_limit_claims_the_default() -> None:
    assert judge(ask(None), [host("h1", memory=DEFAULT_MEMORY_MIB)], [])[0].fits
    assert not judge(ask(None), [host("h1", memory=DEFAULT_MEMORY_MIB - 1)], [])[0].fits


def test_claims_count_once_per_container_at_the_larger_claim() -> None:
    claims = [
        claim("c", "h1", 512, 1.0),
        claim("c", "h1", 600, 0.5, kind="reserved"),
        claim("d", "h1", 100, 0.25, kind="incoming"),
        claim("e", "h2", 999, 3.0),
    ]
    assert used_on("h1", claims) == (700, 1.25)
    assert used_on("h1", claims, excluding="c") == (100, 0.25)
    assert used_on("h3", claims) == (0, 0.0)


def test_cpus_are_checked_only_where_declared_and_asked() -> None:
    claims = [claim("x", "h1", 0, 3.5)]
    [verdict] = judge(ask(256, 1.0), [host("h1", cpus=4.0)], claims)
    assert verdict.reason == "cpus: 3.5 used and reserved + 1 asked > 4 declared"
    assert judge(ask(256, 0.5), [host("h1", cpus=4.0)], claims)[0].fits
    assert judge(ask(256, None), [host("h1", cpus=3.0)], claims)[0].fits
    assert judge(ask(256, 64.0), [host("h1", cpus=None)], claims)[0].fits
    # Float sums must not refuse what adds up exactly on paper.
    assert judge(ask(256, 0.2), [host("h1", cpus=0.3)], [claim("y", "h1", 0, 0.1)])[0].fits


def test_a_host_without_declared_memory_is_never_full_and_ranks_at_the_nominal_size() -> None:
    fleet = [host("h1", "a", memory=None), host("h2", "b", memory=8192)]
    claims = [claim("x", "h1", 100_000), claim("y", "h2", 2048)]
    verdicts = judge(ask(256), fleet, claims)
    assert verdicts[0].fits
    assert verdicts[0].score == (
        (100_000 + 256) / NOMINAL_MEMORY_MIB,
        (100_000 + 256) / NOMINAL_MEMORY_MIB,
        0.0,
    )
    assert choose(ask(256), fleet, claims).host == "h2"


def test_missing_cpu_flags_rule_a_host_out_and_are_named() -> None:
    started = frozenset({"avx2", "avx512f", "sse4_2"})
    fleet = [
        host("h1", flags=frozenset({"avx2", "sse4_2"})),
        host("h2", flags=started | {"aes"}, memory=1024),
        host("h3", flags=None, memory=512),
    ]
    choice = choose(ask(256, flags=started), fleet, [])
    assert choice.host == "h2"
    reasons = reasons_of(choice.verdicts)
    assert reasons["h1"] == "lacks 1 CPU flag(s) the process started with: avx512f"
    assert choice.verdicts[2].fits  # flags not known: not held against it
    many = frozenset(f"f{i}" for i in range(7))
    [verdict] = judge(ask(256, flags=many), [host("h1", flags=frozenset())], [])
    assert verdict.reason == (
        "lacks 7 CPU flag(s) the process started with: f0, f1, f2, f3, f4, ..."
    )
    # A new container (flags unknown) goes anywhere.
    assert judge(ask(256), [host("h1", flags=frozenset())], [])[0].fits


def test_zone_labels_and_pin_rule_hosts_out_in_order() -> None:
    fleet = [
        host("h1", "a", labels={"disk": "ssd"}),
        host("h2", "b", labels={"disk": "hdd"}),
        host("h3", "b", labels={"disk": "ssd"}),
    ]
    reasons = reasons_of(judge(ask(256, zone="b", host_labels={"disk": "ssd"}), fleet, []))
    assert reasons["h1"] == "in zone a, not zone b"
    assert reasons["h2"] == "lacks label disk=ssd"
    assert reasons["h3"].startswith("fits: zone b ")
    pinned = reasons_of(judge(ask(256, pinned_host="h2", zone="a"), fleet, []))
    assert pinned["h1"] == "pinned to h2"
    assert pinned["h2"] == "in zone b, not zone a"
    assert choose(ask(256, pinned_host="h2"), fleet, []).host == "h2"


# -- refused constraints -------------------------------------------------------------------

FLEET = [
    host("h1", "a", labels={"disk": "ssd"}),
    host("h2", "b", labels={"disk": "hdd", "gpu": "yes"}),
]


@pytest.mark.parametrize(
    ("bad", "field", "said"),
    [
        (ask(zone="x"), "zone", "no host is in zone 'x' (zones: a, b)"),
        (ask(host_labels={"disk": "nvme"}), "host_labels", "disk=nvme (disk on hosts: hdd, ssd)"),
        (ask(host_labels={"rack": "1"}), "host_labels", "no host has a rack label"),
        (ask(pinned_host="h9"), "pinned_host", "pinned to unknown host 'h9'"),
        (ask(pinned_host="h1", zone="b"), "constraints", "pinned to h1 (in zone a, not zone b)"),
        (ask(pinned_host="h1", host_labels={"gpu": "yes"}), "constraints", "lacks label gpu=yes"),
        (ask(pinned_host="h1", only="h2"), "host", "pinned to h1"),
        (ask(only="h9"), "host", "no host named 'h9' (hosts: h1, h2)"),
        (ask(only="h1", zone="b"), "host", "h1: in zone a, not zone b"),
        (ask(only="h2", host_labels={"disk": "ssd"}), "host", "h2: lacks label disk=ssd"),
        (ask(zone="a", host_labels={"gpu": "yes"}), "constraints", "no host in zone a has"),
        (ask(host_labels={"disk": "ssd", "gpu": "yes"}), "constraints", "disk=ssd, gpu=yes"),
        (ask(pinned_host="h1", leaving="h1"), "pinned_host", "pinned to h1: it cannot move"),
        (ask(only="h1", leaving="h1"), "host", "it already runs on h1"),
    ],
)
def test_constraints_no_fleet_state_can_satisfy_are_refused_by_field(
    bad: Ask, field: str, said: str
) -> None:
    with pytest.raises(ConstraintError) as refused:
        validate(bad, FLEET)
    assert refused.value.field == field
    assert said in refused.value.reason
    assert str(refused.value) == f"{field}: {refused.value.reason}"
    with pytest.raises(ConstraintError):
        choose(bad, FLEET, [])


def test_satisfiable_constraints_pass_even_when_no_host_fits_now() -> None:
    validate(ask(zone="a", host_labels={"disk": "ssd"}, pinned_host="h1", only="h1"), FLEET)
    validate(ask(only="h2", leaving="h1"), FLEET)


def test_no_host_fits_lists_every_host_with_its_reason() -> None:
    fleet = [host("h1", cordoned=True), host("h2", memory=1024), host("h3", up=False)]
    claims = [claim("x", "h2", 900)]
    with pytest.raises(NoHostFits) as refused:
        choose(ask(256), fleet, claims)
    assert str(refused.value) == (
        "no host fits: h1: cordoned;"
        " h2: memory: 900 MiB used and reserved + 256 asked > 1024 declared;"
        " h3: down: no heartbeat"
    )
    assert [v.host for v in refused.value.verdicts] == ["h1", "h2", "h3"]
    with pytest.raises(NoHostFits, match="no host fits: the fleet has no hosts"):
        choose(ask(256), [], [])


# -- properties, against a checker and an objective written here ---------------------------

NAMES = ("h0", "h1", "h2", "h3", "h4", "h5")
FLAGS = ("aes", "avx", "avx2", "sse4")
GROUP_SCOPE: dict[str, Scope] = {"g1": "host", "g2": "zone"}
quarters = st.integers(0, 8).map(lambda q: q / 4)  # exact in binary: sums need no slack
flag_sets = st.none() | st.frozensets(st.sampled_from(FLAGS))
label_sets = st.fixed_dictionaries(
    {}, optional={"disk": st.sampled_from(["ssd", "hdd"]), "gpu": st.just("yes")}
)


@st.composite
def fleets(draw: st.DrawFn) -> list[HostView]:
    count = draw(st.integers(1, 6))
    return [
        HostView(
            name=NAMES[i],
            zone=draw(st.sampled_from(["a", "b", "c", ""])),
            labels=draw(label_sets),
            memory_mib=draw(st.none() | st.integers(1, 32).map(lambda m: m * 128)),
            cpus=draw(st.none() | st.integers(1, 16).map(lambda q: q / 4)),
            up=draw(st.sampled_from([True, True, True, False])),
            cordoned=draw(st.sampled_from([False, False, False, True])),
            declared_dead=draw(st.sampled_from([False] * 5 + [True])),
            cpu_flags=draw(flag_sets),
        )
        for i in range(count)
    ]


def claims_on(fleet: Sequence[HostView]) -> st.SearchStrategy[list[Claim]]:
    one = st.builds(
        Claim,
        container=st.sampled_from(["c0", "c1", "c2", "c3", "c4", "new"]),
        host=st.sampled_from([h.name for h in fleet] + ["gone"]),
        memory_mib=st.integers(0, 16).map(lambda m: m * 64),
        cpus=quarters,
        group=st.sampled_from([None, "g1", "g2"]),
        kind=st.sampled_from(["running", "incoming", "reserved"]),
    )
    return st.lists(one, max_size=8)


def asks_on(fleet: Sequence[HostView], container: st.SearchStrategy[str]) -> st.SearchStrategy[Ask]:
    names = [h.name for h in fleet]
    # Mostly unconstrained, so the objective, not the rules, has hosts to choose among.
    maybe_host = st.sampled_from([None] * 8 + [*names, "h9"])
    group = st.sampled_from([None, "g1", "g2"])
    constraint = st.builds(
        lambda zone, labels, g, pinned: Constraint(
            zone, labels, g, GROUP_SCOPE[g] if g else "host", pinned
        ),
        st.sampled_from([None] * 5 + ["a", "b", "c"]),
        st.sampled_from([{}] * 4 + [{"disk": "ssd"}, {"gpu": "yes"}]),
        group,
        st.sampled_from([None] * 6 + names),
    )
    return st.builds(
        Ask,
        container=container,
        memory_mib=st.none() | st.integers(0, 16).map(lambda m: m * 64),
        cpus=st.none() | quarters,
        constraint=constraint,
        leaving=maybe_host,
        only=maybe_host,
        cpu_flags=flag_sets,
    )


def held(on: str, claims: Sequence[Claim], me: str) -> tuple[int, float]:
    """What `on` holds for others: each container once, at its larger claim."""
    memory: dict[str, int] = {}
    cpus: dict[str, float] = {}
    for c in claims:
        if c.host == on and c.container != me:
            memory[c.container] = max(memory.get(c.container, 0), c.memory_mib)
            cpus[c.container] = max(cpus.get(c.container, 0.0), c.cpus)
    return sum(memory.values()), sum(cpus.values())


def failure_domain(name: str, fleet: Sequence[HostView]) -> str:
    zone = next((h.zone for h in fleet if h.name == name), "")
    return f"zone:{zone}" if zone else f"host:{name}"


def asked(a: Ask) -> tuple[int, float]:
    return (128 if a.memory_mib is None else a.memory_mib), (a.cpus or 0.0)


def feasible(a: Ask, h: HostView, fleet: Sequence[HostView], claims: Sequence[Claim]) -> bool:
    c = a.constraint
    memory, cpus = asked(a)
    used_memory, used_cpus = held(h.name, claims, a.container)
    group = c.anti_affinity_group
    mates = [x for x in claims if group and x.group == group and x.container != a.container]
    if c.anti_affinity_scope == "host":
        clash = any(x.host == h.name for x in mates)
    else:
        here = failure_domain(h.name, fleet)
        clash = any(failure_domain(x.host, fleet) == here for x in mates)
    return (
        h.up
        and not h.cordoned
        and not h.declared_dead
        and h.name != a.leaving
        and a.only in (None, h.name)
        and c.pinned_host in (None, h.name)
        and c.zone in (None, h.zone)
        and all(h.labels.get(k) == v for k, v in c.host_labels.items())
        and (a.cpu_flags is None or h.cpu_flags is None or a.cpu_flags <= h.cpu_flags)
        and not clash
        and (h.memory_mib is None or used_memory + memory <= h.memory_mib)
        and (h.cpus is None or cpus == 0 or used_cpus + cpus <= h.cpus)
    )


def objective(
    a: Ask, h: HostView, fleet: Sequence[HostView], claims: Sequence[Claim]
) -> tuple[float, ...]:
    memory, cpus = asked(a)
    here = failure_domain(h.name, fleet)
    terms: list[float] = []
    if a.constraint.anti_affinity_group:
        mates = {
            x.container
            for x in claims
            if x.group == a.constraint.anti_affinity_group
            and x.container != a.container
            and failure_domain(x.host, fleet) == here
        }
        terms.append(len(mates))
    zone = [
        z
        for z in fleet
        if failure_domain(z.name, fleet) == here and z.up and not z.cordoned and not z.declared_dead
    ]
    size = sum(z.memory_mib or NOMINAL_MEMORY_MIB for z in zone)
    terms.append((sum(held(z.name, claims, a.container)[0] for z in zone) + memory) / size)
    used_memory, used_cpus = held(h.name, claims, a.container)
    terms.append((used_memory + memory) / (h.memory_mib or NOMINAL_MEMORY_MIB))
    terms.append(0.0 if h.cpus is None else (used_cpus + cpus) / h.cpus)
    return tuple(terms)


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[HostView], list[Claim], Ask]:
    fleet = draw(fleets())
    claims = draw(claims_on(fleet))
    a = draw(asks_on(fleet, st.sampled_from(["new", "c0", "c1"])))
    return fleet, claims, a


@settings(max_examples=200, deadline=None)
@given(situations())
def test_whatever_is_chosen_satisfies_every_constraint_and_capacity(
    situation: tuple[list[HostView], list[Claim], Ask],
) -> None:
    fleet, claims, a = situation
    try:
        choice = choose(a, fleet, claims)
    except (ConstraintError, NoHostFits):
        return
    [chosen] = [h for h in fleet if h.name == choice.host]
    assert feasible(a, chosen, fleet, claims)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_placing_asks_one_by_one_never_overfills_a_host_or_breaks_a_group(
    data: st.DataObject,
) -> None:
    fleet = data.draw(fleets())
    asks = data.draw(st.lists(asks_on(fleet, st.just("")), max_size=12))
    claims: list[Claim] = []
    for i, a in enumerate(asks):
        a = Ask(f"n{i}", a.memory_mib, a.cpus, a.constraint, None, a.only, a.cpu_flags)
        try:
            chosen = choose(a, fleet, claims).host
        except (ConstraintError, NoHostFits):
            continue
        memory, cpus = asked(a)
        claims.append(
            Claim(a.container, chosen, memory, cpus, a.constraint.anti_affinity_group, "reserved")
        )
    for h in fleet:
        memory, cpus = held(h.name, claims, "")
        assert h.memory_mib is None or memory <= h.memory_mib
        # An ask without CPUs claims 0 of them, so declared CPUs are never passed either.
        assert h.cpus is None or cpus <= h.cpus
    for group, scope in GROUP_SCOPE.items():
        members = [c for c in claims if c.group == group]
        where = [c.host if scope == "host" else failure_domain(c.host, fleet) for c in members]
        assert len(where) == len(set(where)), (group, where)


@settings(max_examples=200, deadline=None)
@given(situations())
def test_the_choice_is_the_best_feasible_host_by_brute_force(
    situation: tuple[list[HostView], list[Claim], Ask],
) -> None:
    fleet, claims, a = situation
    fits = {h.name: objective(a, h, fleet, claims) for h in fleet if feasible(a, h, fleet, claims)}
    verdicts = judge(a, fleet, claims)
    assert {v.host for v in verdicts if v.fits} == set(fits)
    assert {v.host: v.score for v in verdicts if v.fits} == fits
    pinned_move = a.constraint.pinned_host is not None and a.leaving is not None
    try:
        choice = choose(a, fleet, claims)
    except ConstraintError as refused:
        # Refused as impossible: nothing fits now either (a pinned container never moves).
        assert pinned_move or not fits, refused
        return
    except NoHostFits:
        assert not fits
        return
    assert not pinned_move
    assert choice.host == min(fits, key=lambda name: (fits[name], name))
