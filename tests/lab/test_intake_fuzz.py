"""Fuzzed input on the request subject: always a clear error reply, never a change of state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.bus import request_raw
from tests.support.cli import ferry

pytestmark = pytest.mark.lab

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = ["schema_version", "container", "destination", "source", "strategy", "dry_run",
          "inject_fault"]  # fmt: skip
requests = st.one_of(
    # Random JSON of any shape.
    json_values.map(lambda v: json.dumps(v).encode()),
    # Objects with Ferry's field names but random values (never a real container).
    st.fixed_dictionaries(
        {},
        optional={
            f: (json_values if f != "container" else st.text(max_size=80).map(lambda s: "zz" + s))
            for f in FIELDS
        },
    ).map(lambda d: json.dumps(d).encode()),
    # Unknown versions of an otherwise plausible request.
    st.integers()
    .filter(lambda v: v != 1)
    .map(
        lambda v: json.dumps(
            {"schema_version": v, "container": "victim", "destination": "h2"}
        ).encode()
    ),
    # Bytes that are not JSON at all.
    st.binary(max_size=300),
)


@pytest.fixture(scope="module")
def victim(lab2: str, rootfs: Path) -> str:
    run = ferry(
        lab2, "container", "run", "--host", "h1", "--name", "victim", "--rootfs", str(rootfs),
        "--", "/bin/memapp", "7000",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    return lab2


def _state(lab: str) -> tuple[Any, Any]:
    return (
        ferry(lab, "containers", "--json", check=True).json(),
        ferry(lab, "status", "--json", check=True).json(),
    )


def _assert_clear_error(reply: dict[str, Any], payload: bytes) -> None:
    assert set(reply) == {"error"}, (payload[:200], reply)
    error = reply["error"]
    assert isinstance(error["reason"], str) and error["reason"], payload[:200]
    assert error["field"] is None or isinstance(error["field"], str)


def test_random_requests_get_a_clear_error_and_change_nothing(victim: str) -> None:
    before = _state(victim)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(requests)
    def check(payload: bytes) -> None:
        _assert_clear_error(asyncio.run(request_raw(victim, payload)), payload)

    check()
    assert _state(victim) == before


def test_huge_payloads_are_refused_cleanly(victim: str) -> None:
    before = _state(victim)
    for payload in (
        json.dumps({"container": "v" * 1_000_000, "destination": "h2"}).encode(),
        json.dumps({"container": "victim", "destination": ["h2"] * 200_000}).encode(),
        b"[" * 100_000 + b"]" * 100_000,
    ):
        reply = asyncio.run(request_raw(victim, payload, timeout=30))
        _assert_clear_error(reply, payload)
    assert _state(victim) == before
