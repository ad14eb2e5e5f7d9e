"""The v1 wire contract: strict on what matters, tolerant of what newer senders add."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.v1.containers import CreateContainer, Placement
from schemas.v1.hosts import HostHeartbeat

DIGEST = "a" * 64


def test_a_request_round_trips_through_bytes() -> None:
    cmd = CreateContainer(name="web", layer=DIGEST, args=("/bin/app", "7000"), memory_mib=64)
    assert CreateContainer.from_bytes(cmd.to_bytes()) == cmd


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"layer": "xyz"}, "layer"),
        ({"args": []}, "args"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"schema_version": 2}, "schema_version"),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], field: str) -> None:
    data = {"name": "web", "layer": DIGEST, "args": ["/bin/app"], **change}
    with pytest.raises(ValidationError) as caught:
        CreateContainer.model_validate_json(json.dumps(data))
    assert caught.value.errors()[0]["loc"][0] == field


def test_unknown_fields_from_newer_senders_are_ignored() -> None:
    data = {"name": "web", "layer": DIGEST, "args": ["/bin/app"], "priority": "high"}
    assert CreateContainer.model_validate_json(json.dumps(data)).name == "web"


def test_messages_are_frozen() -> None:
    placement = Placement(
        name="web",
        host="h1",
        ip="10.0.0.5",
        mac="02:fe:0a:00:00:05",
        layer=DIGEST,
        args=("/bin/app",),
    )
    with pytest.raises(ValidationError):
        placement.host = "h2"  # type: ignore[misc]
    assert placement.model_copy(update={"state": "running"}).state == "running"


def test_heartbeat_defaults() -> None:
    beat = HostHeartbeat(host="h1", address="10.0.0.11", agent_pid=7, sent_at=1.0)
    assert beat.workers == () and beat.schema_version == 1
