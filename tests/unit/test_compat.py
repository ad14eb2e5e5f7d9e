"""Which pairs of hosts may take part in one migration during a rolling upgrade: the wire
ranges must overlap, the destination's CRIU must not be older, runc must share a major;
kernels and unknown versions are said, never refused on."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.v1.hosts import HostRegistration
from schemas.v1.versions import UNKNOWN, HostVersions
from services.errors import Incompatible, InvalidInput
from services.preflight import refuse_incompatible
from workflows.compat import OLDER_AGENT, incompatibilities, notes, release


def host(
    wire: int = 1,
    wire_min: int = 1,
    *,
    criu: str = "4.2.1",
    runc: str = "1.1.5+ds1",
    kernel: str = "6.1.0-28-amd64",
) -> HostVersions:
    return HostVersions(
        wire=wire, wire_min=wire_min, ferry="0.1.0", criu=criu, runc=runc, kernel=kernel
    )


def registration(name: str, versions: HostVersions | None) -> HostRegistration:
    return HostRegistration(host=name, address="10.0.0.1", registered_at=1.0, versions=versions)


ranges = st.tuples(st.integers(1, 6), st.integers(0, 3)).map(lambda t: (t[0] + t[1], t[0]))


@given(ranges, ranges)
def test_wire_ranges_are_compatible_exactly_when_they_share_a_version(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    source, destination = host(*a), host(*b)
    shared = set(range(a[1], a[0] + 1)) & set(range(b[1], b[0] + 1))
    reasons = incompatibilities(source, destination)
    assert (reasons == []) == bool(shared), (a, b, reasons)
    # Symmetric: the wire says nothing about direction.
    assert (incompatibilities(destination, source) == []) == bool(shared)


@given(ranges, ranges)
def test_a_wire_refusal_names_both_ranges_and_both_hosts(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    reasons = incompatibilities(host(*a), host(*b), source_name="h1", destination_name="h2")
    for reason in reasons:
        assert f"{a[1]}..{a[0]}" in reason and f"{b[1]}..{b[0]}" in reason, reason
        assert "h1" in reason and "h2" in reason, reason


def test_the_too_old_side_is_the_one_to_upgrade() -> None:
    (old_source,) = incompatibilities(
        host(1, 1), host(3, 3), source_name="h1", destination_name="h2"
    )
    assert old_source.startswith("h2 speaks wire 3..3, h1 speaks 1..1: no common version")
    assert "upgrade h1" in old_source
    (old_destination,) = incompatibilities(
        host(3, 3), host(1, 1), source_name="h1", destination_name="h2"
    )
    assert "upgrade h2" in old_destination


def test_one_agent_upgraded_within_the_range_keeps_working() -> None:
    assert incompatibilities(host(1, 1), host(2, 1)) == []
    assert incompatibilities(host(2, 1), host(1, 1)) == []


def test_an_empty_range_overlaps_nothing() -> None:
    (reason,) = incompatibilities(host(2, 2), host(1, 3))
    assert "empty range" in reason


versions = st.tuples(st.integers(0, 9), st.integers(0, 30), st.integers(0, 9))


@given(versions, versions)
def test_criu_may_only_stay_or_get_newer_towards_the_destination(
    src: tuple[int, int, int], dst: tuple[int, int, int]
) -> None:
    said = [".".join(map(str, v)) for v in (src, dst)]
    reasons = incompatibilities(host(criu=said[0]), host(criu=said[1]))
    assert (reasons == []) == (dst[:2] >= src[:2]), (said, reasons)
    for reason in reasons:
        assert said[0] in reason and said[1] in reason and "CRIU" in reason


def test_a_newer_criu_patch_release_on_the_source_is_no_reason() -> None:
    assert incompatibilities(host(criu="4.2.1"), host(criu="4.2")) == []
    (reason,) = incompatibilities(host(criu="4.2.1"), host(criu="4.1.1"), destination_name="h2")
    assert "upgrade h2's CRIU to 4.2 or newer" in reason


@pytest.mark.parametrize(
    ("source", "destination", "ok"),
    [
        ("1.1.5+ds1", "1.2.0", True),
        ("1.2.0", "1.1.12", True),
        ("1.1.5+ds1", "2.0.0-rc.1", False),
        ("v2.0.0", "1.1.5", False),
    ],
)
def test_runc_must_share_a_major(source: str, destination: str, ok: bool) -> None:
    reasons = incompatibilities(host(runc=source), host(runc=destination))
    assert (reasons == []) is ok, reasons
    for reason in reasons:
        assert source in reason and destination in reason


def test_unknown_tools_are_said_never_refused() -> None:
    unknown = host(criu=UNKNOWN, runc="garbage", kernel=UNKNOWN)
    assert incompatibilities(unknown, host(criu="1.0")) == []
    assert incompatibilities(host(criu="9.9"), unknown) == []
    said = notes(unknown, host(), source_name="h1")
    assert said == ["h1's CRIU and runc version unknown: not compared"]


def test_kernels_are_reported_not_refused() -> None:
    a, b = host(kernel="6.1.0-28-amd64"), host(kernel="6.12.9-amd64")
    assert incompatibilities(a, b) == []
    (said,) = notes(a, b, source_name="h1", destination_name="h2")
    assert "6.1.0-28-amd64" in said and "6.12.9-amd64" in said


def test_an_older_agent_is_judged_as_wire_1_with_unknown_tools() -> None:
    assert (OLDER_AGENT.wire_min, OLDER_AGENT.wire) == (1, 1)
    assert release(OLDER_AGENT.criu) is None and release(OLDER_AGENT.runc) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4.2.1", (4, 2)), ("1.1.5+ds1", (1, 1)), ("v1.2.0-rc.1", (1, 2)), ("4", (4, 0))],
)
def test_release_reads_major_and_minor(text: str, expected: tuple[int, int]) -> None:
    assert release(text) == expected


# ---- pre-flight: the registrations as the bus holds them -----------------------------------


def test_preflight_refuses_naming_both_hosts_and_versions() -> None:
    with pytest.raises(Incompatible) as refused:
        refuse_incompatible(
            "h1", registration("h1", host(1, 1)), "h2", registration("h2", host(3, 3))
        )
    error = refused.value
    assert isinstance(error, InvalidInput) and not error.retryable
    assert error.field == "destination" and error.kind == "invalid"
    assert "h2 speaks wire 3..3, h1 speaks 1..1: no common version; upgrade h1" in error.reason


def test_preflight_lets_a_pair_within_range_through() -> None:
    refuse_incompatible("h1", registration("h1", host(1, 1)), "h2", registration("h2", host(2, 1)))


def test_preflight_judges_an_older_agent_as_wire_1_and_says_so() -> None:
    older = registration("h1", None)
    refuse_incompatible("h1", older, "h2", registration("h2", host(2, 1, criu="1.0")))
    refuse_incompatible("h1", None, "h2", registration("h2", host(1, 1)))  # none at all
    with pytest.raises(Incompatible) as refused:
        refuse_incompatible("h1", older, "h2", registration("h2", host(3, 2)))
    reason = refused.value.reason
    assert "h2 speaks wire 2..3, h1 speaks 1..1" in reason
    assert "h1 announced no versions (an older agent): judged as wire 1..1" in reason
    assert "CRIU and runc version unknown" in reason


def test_an_old_registration_without_versions_still_parses() -> None:
    old = b'{"schema_version": 1, "host": "h1", "address": "10.0.0.1", "registered_at": 1.0}'
    assert HostRegistration.from_bytes(old).versions is None
    newer = registration("h1", host(2, 1)).to_bytes()
    assert HostRegistration.from_bytes(newer).versions == host(2, 1)
