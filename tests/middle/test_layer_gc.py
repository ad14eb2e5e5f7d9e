"""Unused layers leave a host on positive evidence, seen twice, against a real bus."""

from __future__ import annotations

import json
import time
from pathlib import Path

from schemas import subjects
from schemas.v1.containers import Image
from services import bus as ferry_bus
from services.cleanup.layers import LayerCollector, mounted_layers
from services.kvstores import KvImageStore, KvPlacementStore
from tests.support import records
from tests.support.natsserver import Bus
from workflows.layer_gc import layers_to_remove
from workflows.placement_chain import OPERATOR_AUTHOR

IMAGED, PLACED, UNUSED, FRESH = ("1" * 64, records.LAYER, "3" * 64, "4" * 64)


def _held(layers_dir: Path, digest: str, unpacked_at: float) -> None:
    (layers_dir / digest).mkdir(parents=True)
    (layers_dir / digest / "file").write_text("x")
    (layers_dir / f"{digest}.json").write_text(
        json.dumps({"size_bytes": 1, "unpacked_at": unpacked_at})
    )


async def test_only_a_layer_nothing_needs_goes_and_only_on_the_second_sweep(
    bus: Bus, placements: KvPlacementStore, tmp_path: Path
) -> None:
    images = KvImageStore(await ferry_bus.bucket(bus.js, subjects.IMAGES_BUCKET))
    await images.put(Image(name="app", layers=(IMAGED,), created_at=time.time()))
    await placements.claim(records.placement("web", "h2"))  # placed elsewhere: may move here
    layers_dir = tmp_path / "layers"
    old = time.time() - 3600
    for digest in (IMAGED, PLACED, UNUSED):
        _held(layers_dir, digest, old)
    _held(layers_dir, FRESH, time.time())  # just unpacked: a create may be about to name it
    sweeper = LayerCollector(layers_dir, images, placements, min_age_s=60)

    assert await sweeper.sweep() == []  # seen once
    assert (layers_dir / UNUSED).is_dir()
    assert await sweeper.sweep() == [UNUSED]
    assert sorted(p.name for p in layers_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [IMAGED, f"{IMAGED}.json", PLACED, f"{PLACED}.json", FRESH, f"{FRESH}.json"]
    )


async def test_an_unknown_answer_removes_nothing_and_starts_the_count_again(
    bus: Bus, tmp_path: Path
) -> None:
    quick_js = bus.nc.jetstream(timeout=0.5)  # each listing gives up quickly while it is down
    images = KvImageStore(await quick_js.key_value(subjects.IMAGES_BUCKET))
    placements = KvPlacementStore(
        await quick_js.key_value(subjects.PLACEMENT_BUCKET), author=OPERATOR_AUTHOR
    )
    layers_dir = tmp_path / "layers"
    _held(layers_dir, UNUSED, time.time() - 3600)
    sweeper = LayerCollector(layers_dir, images, placements, min_age_s=60)
    assert await sweeper.sweep() == []  # seen once
    bus.server.stop()
    try:
        assert await sweeper.sweep() == []  # the bus is down: unknown, not "nothing needs it"
    finally:
        bus.server.restart()
    assert await sweeper.sweep() == []  # the count started again
    assert (layers_dir / UNUSED).is_dir()
    assert await sweeper.sweep() == [UNUSED]


def test_the_lower_dirs_of_mounted_overlays_are_needed() -> None:
    layers_dir = Path("/var/lib/ferry/layers")
    mountinfo = (
        "36 25 0:32 / /var/lib/ferry/containers/web/rootfs rw,relatime shared:1 - overlay"
        f" overlay rw,lowerdir={layers_dir}/{'a' * 64}:{layers_dir}/{'b' * 64},"
        "upperdir=/var/lib/ferry/containers/web/upper,workdir=/var/lib/ferry/containers/web/work\n"
        "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    )
    assert mounted_layers(layers_dir, mountinfo) == {"a" * 64, "b" * 64}


def test_the_rules_need_two_sightings_and_an_age() -> None:
    held = {"x": 0.0, "y": 0.0, "z": 990.0}
    first, suspects = layers_to_remove(held, {"y"}, set(), now=1000, min_age_s=60)
    assert first == set() and suspects == {"x"}
    second, _ = layers_to_remove(held, {"y"}, suspects, now=1030, min_age_s=60)
    assert second == {"x"}
    assert layers_to_remove(held, None, suspects, now=1030, min_age_s=60) == (set(), set())
