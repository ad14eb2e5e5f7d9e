"""Root filesystem layers: reproducible digests, verified and atomic unpacking."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest

from schemas.v1.containers import PullLayers
from services.config import HostConfig
from services.errors import InvalidInput, NotFound, RuntimeFailure
from services.runtime.containers import HostContainers
from services.runtime.layers import (
    held_layers,
    layer_lock,
    overlay_options,
    pack_rootfs,
    unpack_layer,
)


def _tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(b"\x7fELF fake")
    (root / "bin" / "app").chmod(0o755)
    (root / "bin" / "sh").symlink_to("app")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    return root


def test_the_same_tree_gives_the_same_digest(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "rootfs")
    first = pack_rootfs(tree, tmp_path / "a.tar")
    second = pack_rootfs(tree, tmp_path / "b.tar")
    assert first == second and len(first) == 64


def test_unpack_keeps_modes_and_links_and_is_idempotent(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "rootfs")
    digest = pack_rootfs(tree, tmp_path / "layer.tar")
    out = unpack_layer(tmp_path / "layer.tar", digest, tmp_path / "layers")
    assert (out / "bin" / "app").read_bytes() == b"\x7fELF fake"
    assert os.readlink(out / "bin" / "sh") == "app"
    assert (out / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert unpack_layer(tmp_path / "layer.tar", digest, tmp_path / "layers") == out


def test_a_corrupted_layer_is_refused_and_may_be_fetched_again(tmp_path: Path) -> None:
    digest = pack_rootfs(_tree(tmp_path / "rootfs"), tmp_path / "layer.tar")
    with (tmp_path / "layer.tar").open("r+b") as f:
        f.seek(600)
        f.write(b"XX")
    with pytest.raises(RuntimeFailure) as caught:
        unpack_layer(tmp_path / "layer.tar", digest, tmp_path / "layers")
    assert caught.value.retryable
    assert not (tmp_path / "layers" / digest).exists()


def test_paths_escaping_the_layer_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(payload, arcname="../outside")
    from services.runtime.layers import file_digest

    with pytest.raises(RuntimeFailure, match="unsafe path"):
        unpack_layer(evil, file_digest(evil), tmp_path / "layers")
    assert not (tmp_path / "outside").exists()


def test_a_missing_rootfs_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        pack_rootfs(tmp_path / "nope", tmp_path / "x.tar")
    assert caught.value.field == "--rootfs"


def test_overlay_lists_the_uppermost_layer_first(tmp_path: Path) -> None:
    base, app, patch = tmp_path / "base", tmp_path / "app", tmp_path / "patch"
    options = overlay_options([base, app, patch], tmp_path / "upper", tmp_path / "work")
    assert options == (
        f"lowerdir={patch}:{app}:{base},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    )
    assert overlay_options([base], tmp_path / "u", tmp_path / "w").startswith(f"lowerdir={base},")
    with pytest.raises(RuntimeFailure):
        overlay_options([], tmp_path / "u", tmp_path / "w")


def test_an_unpacked_layer_is_listed_with_its_size(tmp_path: Path) -> None:
    digest = pack_rootfs(_tree(tmp_path / "rootfs"), tmp_path / "layer.tar")
    layers_dir = tmp_path / "layers"
    assert held_layers(layers_dir) == []
    unpack_layer(tmp_path / "layer.tar", digest, layers_dir)
    (layers_dir / f".{'c' * 64}.unpacking").mkdir()  # half-done: not a layer yet
    (held,) = held_layers(layers_dir)
    assert held.digest == digest
    assert held.size_bytes == (tmp_path / "layer.tar").stat().st_size
    assert held.unpacked_at > 0


class FakeStore:
    """A layer store that counts fetches and can damage the first ones."""

    def __init__(self, tars: dict[str, bytes], damaged: int = 0) -> None:
        self.tars = tars
        self.damaged = damaged
        self.fetches: list[str] = []

    async def fetch(self, digest: str, into: Path) -> None:
        self.fetches.append(digest)
        await asyncio.sleep(0.05)  # long enough for concurrent callers to pile up
        if digest not in self.tars:
            raise NotFound(f"layer {digest[:12]} is not in the layer store", field="layer")
        data = self.tars[digest]
        if self.damaged > 0:
            self.damaged -= 1
            data = data[:600] + b"XX" + data[602:]
        into.write_bytes(data)


def _host(tmp_path: Path, store: FakeStore) -> HostContainers:
    config = HostConfig(
        host="h1",
        address="10.0.0.11",
        nats_servers=("nats://127.0.0.1:4222",),
        subnet=ipaddress.IPv4Network("10.0.0.0/24"),
        gateway="10.0.0.1",
        ip_pool=(100, 200),
        state_dir=tmp_path / "state",
    )
    return HostContainers(config, cast(Any, None), cast(Any, None), store)


def _two_layers(tmp_path: Path) -> tuple[str, str, dict[str, bytes]]:
    base = _tree(tmp_path / "base")
    app = tmp_path / "app"
    (app / "etc").mkdir(parents=True)
    (app / "etc" / "motd").write_text("hello\n")
    lower = pack_rootfs(base, tmp_path / "base.tar")
    upper = pack_rootfs(app, tmp_path / "app.tar")
    tars = {lower: (tmp_path / "base.tar").read_bytes(), upper: (tmp_path / "app.tar").read_bytes()}
    return lower, upper, tars


async def test_layers_are_fetched_once_per_host_even_when_asked_at_once(tmp_path: Path) -> None:
    lower, upper, tars = _two_layers(tmp_path)
    store = FakeStore(tars)
    host = _host(tmp_path, store)
    first, second = await asyncio.gather(
        host.ensure_layers((lower, upper)), host.ensure_layers((lower, upper))
    )
    assert sorted(store.fetches) == sorted([lower, upper])
    assert (
        first.paths
        == second.paths
        == (
            host.config.layers_dir / lower,
            host.config.layers_dir / upper,
        )
    )
    assert (first.paths[1] / "etc" / "motd").read_text() == "hello\n"
    assert set(first.fetched + second.fetched) == {lower, upper}
    assert first.bytes_fetched + second.bytes_fetched == sum(len(t) for t in tars.values())

    again = await host.ensure_layers((lower, upper))
    assert again.fetched == () and again.present == (lower, upper) and again.bytes_fetched == 0
    assert len(store.fetches) == 2
    pulled = await host.pull_layers(PullLayers(layers=(lower, upper), image="app"))
    assert (pulled.host, pulled.fetched, pulled.present) == ("h1", (), (lower, upper))
    listed = await host.list_layers()
    assert {layer.digest for layer in listed.layers} == {lower, upper}
    assert not [p for p in host.config.layers_dir.iterdir() if p.name.endswith(".tar")]


async def test_a_corrupted_fetch_is_retried_and_verified(tmp_path: Path) -> None:
    lower, _, tars = _two_layers(tmp_path)
    store = FakeStore(tars, damaged=1)
    host = _host(tmp_path, store)
    ready = await host.ensure_layers((lower,))
    assert ready.fetched == (lower,) and store.fetches == [lower, lower]


async def test_a_layer_that_stays_corrupted_is_never_unpacked(tmp_path: Path) -> None:
    lower, _, tars = _two_layers(tmp_path)
    host = _host(tmp_path, FakeStore(tars, damaged=99))
    with pytest.raises(RuntimeFailure, match="corrupted") as caught:
        await host.ensure_layers((lower,))
    assert caught.value.retryable
    assert not (host.config.layers_dir / lower).exists()


async def test_a_missing_layer_is_not_found(tmp_path: Path) -> None:
    host = _host(tmp_path, FakeStore({}))
    with pytest.raises(NotFound):
        await host.ensure_layers(("d" * 64,))


async def test_the_file_lock_serializes_across_processes(tmp_path: Path) -> None:
    order: list[str] = []

    async def hold(tag: str) -> None:
        async with layer_lock(tmp_path, "e" * 64):
            order.append(f"{tag}+")
            await asyncio.sleep(0.15)
            order.append(f"{tag}-")

    await asyncio.gather(hold("a"), hold("b"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
