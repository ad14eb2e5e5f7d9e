"""The v1 wire contract: strict on what matters, tolerant of what newer senders add."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.v1.containers import (
    MAX_LAYERS,
    CreateContainer,
    HostLayer,
    Image,
    LayerList,
    Placement,
    PullLayers,
)
from schemas.v1.hosts import HostHeartbeat

DIGEST = "a" * 64
OTHER = "b" * 64


def test_a_request_round_trips_through_bytes() -> None:
    cmd = CreateContainer(
        name="web", layers=(DIGEST, OTHER), args=("/bin/app", "7000"), memory_mib=64, image="app"
    )
    assert CreateContainer.from_bytes(cmd.to_bytes()) == cmd


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"layers": ["xyz"]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": [DIGEST, OTHER, DIGEST]}, "layers"),
        ({"layers": [f"{i:064x}" for i in range(MAX_LAYERS + 1)]}, "layers"),
        ({"image": "Not An Image"}, "image"),
        ({"args": []}, "args"),
        ({"memory_mib": 1}, "memory_mib"),
        ({"schema_version": 2}, "schema_version"),
    ],
)
def test_bad_fields_are_named(change: dict[str, object], field: str) -> None:
    data = {"name": "web", "layers": [DIGEST], "args": ["/bin/app"], **change}
    with pytest.raises(ValidationError) as caught:
        CreateContainer.model_validate_json(json.dumps(data))
    assert caught.value.errors()[0]["loc"][0] == field


def test_unknown_fields_from_newer_senders_are_ignored() -> None:
    data = {"name": "web", "layers": [DIGEST], "args": ["/bin/app"], "priority": "high"}
    assert CreateContainer.model_validate_json(json.dumps(data)).name == "web"


def test_messages_are_frozen() -> None:
    placement = Placement(
        name="web",
        host="h1",
        ip="10.0.0.5",
        mac="02:fe:0a:00:00:05",
        layers=(DIGEST,),
        args=("/bin/app",),
    )
    with pytest.raises(ValidationError):
        placement.host = "h2"  # type: ignore[misc]
    assert placement.model_copy(update={"state": "running"}).state == "running"


def test_heartbeat_defaults() -> None:
    beat = HostHeartbeat(host="h1", address="10.0.0.11", agent_pid=7, sent_at=1.0)
    assert beat.workers == () and beat.schema_version == 1


def test_a_record_from_before_images_reads_as_a_one_layer_stack() -> None:
    old = {"name": "web", "host": "h1", "ip": "10.0.0.5", "mac": "02:fe:0a:00:00:05",
           "layer": DIGEST, "args": ["/bin/app"], "state": "running"}  # fmt: skip
    placement = Placement.model_validate_json(json.dumps(old))
    assert placement.layers == (DIGEST,) and placement.image is None
    assert "layer" not in json.loads(placement.to_bytes())


def test_layers_keep_their_order_lowest_first() -> None:
    cmd = CreateContainer(name="web", layers=(OTHER, DIGEST), args=("/bin/app",))
    assert CreateContainer.from_bytes(cmd.to_bytes()).layers == (OTHER, DIGEST)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Base"}, "name"),
        ({"name": "-base"}, "name"),
        ({"name": "b" * 64}, "name"),
        ({"name": "has space"}, "name"),
        ({"base": "Nope!"}, "base"),
        ({"layers": []}, "layers"),
        ({"layers": [DIGEST, DIGEST]}, "layers"),
        ({"created_at": "yesterday"}, "created_at"),
    ],
)
def test_image_fields_are_checked_and_named(change: dict[str, object], field: str) -> None:
    data = {"name": "app", "layers": [DIGEST, OTHER], "base": "base", "created_at": 1.0, **change}
    with pytest.raises(ValidationError) as caught:
        Image.model_validate_json(json.dumps(data))
    assert caught.value.errors()[0]["loc"][0] == field


def test_good_image_names_pass() -> None:
    for name in ("app", "0", "busybox-1.36", "my_app.v2", "a" * 63):
        assert Image(name=name, layers=(DIGEST,), created_at=1.0).name == name


def test_a_duplicate_layer_says_which() -> None:
    with pytest.raises(ValidationError, match="layer aaaaaaaaaaaa appears twice"):
        PullLayers(layers=(DIGEST, OTHER, DIGEST))


def test_a_layer_listing_round_trips() -> None:
    listing = LayerList(
        host="h1", layers=(HostLayer(digest=DIGEST, size_bytes=10240, unpacked_at=2.5),)
    )
    assert LayerList.from_bytes(listing.to_bytes()) == listing
    with pytest.raises(ValidationError):
        HostLayer(digest=DIGEST, size_bytes=-1, unpacked_at=0.0)
