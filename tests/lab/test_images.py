"""Images of read-only layers end to end: built once, pulled ahead, never carried by a move.

A base layer (busybox + memapp) and an app layer on top (/etc/motd and a script) make the
image `app`. Only h1 pulls it; a container runs from it on h1 and writes into its upper dir;
it moves to h2 (stop-and-copy), where the two layers arrive once from the layer store,
sha256-verified, and back to h1 (post-copy), where nothing layer-shaped moves at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.workloads import MEMAPP
from tests.conftest import new_lab_name
from tests.support.bus import operator_nats
from tests.support.cli import ferry
from tests.support.workload import PORT, build_rootfs, query, wait_until_serving

pytestmark = pytest.mark.lab

BUFFER_MIB = 8
MOTD = "served from the app layer\n"
SCRIPT = "#!/bin/sh\necho hello from the app layer\n"
NAME = "imgmem"
DIGEST = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def img_lab(lab_capable: None) -> Iterator[str]:
    """A two-host lab of its own."""
    name = new_lab_name()
    up = ferry(name, "lab", "up", "--hosts", "2", timeout=180)
    assert up.code == 0, up.stderr
    yield name
    down = ferry(name, "lab", "down", timeout=180)
    assert down.code == 0, down.stderr


@pytest.fixture(scope="module")
def layer_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base: busybox + memapp, app: /etc/motd and /bin/hello.sh)."""
    base = build_rootfs(tmp_path_factory.mktemp("base"))
    app = tmp_path_factory.mktemp("app")
    (app / "etc").mkdir()
    (app / "etc" / "motd").write_text(MOTD)
    (app / "bin").mkdir()
    (app / "bin" / "hello.sh").write_text(SCRIPT)
    (app / "bin" / "hello.sh").chmod(0o755)
    return base, app


@pytest.fixture(scope="module")
def images(img_lab: str, layer_dirs: tuple[Path, Path]) -> dict[str, Any]:
    """`base` and `app` (= base's layer + the app layer), as `image build --json` reports."""
    base_dir, app_dir = layer_dirs
    base = ferry(img_lab, "image", "build", str(base_dir), "--name", "base", "--json")
    assert base.code == 0, base.stderr
    app = ferry(
        img_lab, "image", "build", str(app_dir), "--name", "app", "--base", "base", "--json"
    )
    assert app.code == 0, app.stderr
    return {"base": base.json(), "app": app.json()}


def _state(lab: str, host: str) -> Path:
    return Path(f"/var/lib/ferry-lab/{lab}/hosts/{host}")


def _held(lab: str, host: str) -> dict[str, tuple[int, int]]:
    """The layers a host holds, straight from its disk: digest -> (inode, mtime_ns)."""
    layers = _state(lab, host) / "layers"
    if not layers.is_dir():
        return {}
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in layers.iterdir()
        if DIGEST.match(p.name) and p.is_dir()
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _in_container(lab: str, host: str, *argv: str) -> str:
    """Run a command in the container's own mount namespace (its overlay root)."""
    root = _state(lab, host) / "runc"
    state = subprocess.run(
        ["runc", "--root", str(root), "state", NAME], capture_output=True, text=True, check=True
    )
    pid = json.loads(state.stdout)["pid"]
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-m", "--", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=15,
    )
    return out.stdout


def _prepare_span(lab: str, migration_id: str) -> dict[str, Any]:
    spans = ferry(lab, "trace", migration_id, "--json", check=True).json()
    (span,) = [s for s in spans if s["name"] == "step prepare_destination"]
    return dict(span["attributes"])


def _layer_fetches_logged(lab: str, host: str) -> int:
    logs = (_state(lab, host) / "log").glob("*.log")
    return sum(p.read_text().count("fetched from the layer store") for p in logs)


def _image_ls(lab: str) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in ferry(lab, "image", "ls", "--json", check=True).json()}


async def _store_objects(lab: str) -> list[str]:
    nc = await operator_nats(lab)
    try:
        store = await nc.jetstream().object_store("ferry-layers")
        return sorted(info.name for info in await store.list())
    finally:
        await nc.close()


def test_images_are_stacks_of_layers_built_once(
    img_lab: str, images: dict[str, Any], layer_dirs: tuple[Path, Path]
) -> None:
    base, app = images["base"], images["app"]
    (base_layer,) = [layer["digest"] for layer in base["layers"]]
    assert app["layers"][0]["digest"] == base_layer, "lowest first"
    assert len(app["layers"]) == 2 and app["base"] == "base"
    assert app["size_bytes"] == sum(layer["size_bytes"] for layer in app["layers"])
    # Building the same directory again finds its layer in the store: nothing is uploaded.
    again = ferry(img_lab, "image", "build", str(layer_dirs[1]), "--name", "app", "--base", "base")
    assert again.code == 0, again.stderr
    assert "already in the layer store" in again.stderr and "uploading" not in again.stderr
    assert again.stdout.split() == [layer["digest"] for layer in app["layers"]]
    # Nobody pulled anything yet: no host holds a layer.
    listed = _image_ls(img_lab)
    assert listed["app"]["hosts"] == {"h1": [], "h2": []}
    text = ferry(img_lab, "image", "ls", check=True).stdout
    assert re.search(r"^app\s+\S+,\S+\s+[\d.]+ MiB\s+0/2\s+0/2", text, re.M), text


def test_a_container_moves_without_its_layers(img_lab: str, images: dict[str, Any]) -> None:
    layers = [layer["digest"] for layer in images["app"]["layers"]]
    sizes = {layer["digest"]: layer["size_bytes"] for layer in images["app"]["layers"]}

    # Pulled onto h1 only: fetched, verified, unpacked there; h2 has none.
    pulled = ferry(img_lab, "image", "pull", "app", "--host", "h1", "--json", timeout=300)
    assert pulled.code == 0, pulled.stderr
    (on_h1,) = pulled.json()
    assert (on_h1["host"], on_h1["fetched"], on_h1["present"]) == ("h1", layers, [])
    assert on_h1["bytes_fetched"] == sum(sizes.values())
    listed = _image_ls(img_lab)
    assert listed["app"]["hosts"] == {"h1": layers, "h2": []}
    assert listed["base"]["hosts"] == {"h1": layers[:1], "h2": []}
    assert set(_held(img_lab, "h1")) == set(layers) and _held(img_lab, "h2") == {}
    h1_layers = _held(img_lab, "h1")
    assert _layer_fetches_logged(img_lab, "h1") == 2

    run = ferry(
        img_lab, "container", "run", "--host", "h1", "--name", NAME, "--image", "app",
        "--memory", "64", "--", "/bin/sh", "-c",
        f"echo written > /tmp/mark; exec /bin/memapp {PORT} {BUFFER_MIB}",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    ip = run.stdout.strip().splitlines()[-1]
    first = wait_until_serving(ip)
    assert first["buffer_ok"] is True and first["buffer_mib"] == BUFFER_MIB
    assert _in_container(img_lab, "h1", "/bin/cat", "/etc/motd") == MOTD
    assert _in_container(img_lab, "h1", "/bin/hello.sh") == "hello from the app layer\n"
    assert _layer_fetches_logged(img_lab, "h1") == 2, "the pulled layers were fetched again"

    # h1 -> h2, stop-and-copy: h2 lacks both layers and fetches them once from the store.
    moved = ferry(
        img_lab, "migrate", NAME, "--to", "h2", "--strategy", "stop-and-copy", "--json",
        timeout=300,
    )  # fmt: skip
    assert moved.code == 0, moved.stderr
    record = moved.json()
    assert record["state"] == "completed", record
    assert "2 of 2 layer(s) were missing here" in moved.stderr
    facts = _prepare_span(img_lab, record["id"])
    assert facts["ferry.layers_fetched"] == 2 and facts["ferry.layers_present"] == 0
    assert facts["ferry.layer_bytes_fetched"] == sum(sizes.values())

    # h2 now holds exactly the image's layers, byte-identical to what was built.
    assert set(_held(img_lab, "h2")) == set(layers)
    assert _image_ls(img_lab)["app"]["hosts"] == {"h1": layers, "h2": layers}
    h2_base, h2_app = (_state(img_lab, "h2") / "layers" / d for d in layers)
    assert _sha256(h2_base / "bin" / "memapp") == _sha256(MEMAPP)
    assert _sha256(h2_base / "bin" / "busybox") == _sha256(Path("/bin/busybox"))
    assert (h2_app / "etc" / "motd").read_text() == MOTD
    for digest in layers:  # what the host recorded is the size of the tar it verified
        meta = json.loads((_state(img_lab, "h2") / "layers" / f"{digest}.json").read_text())
        assert meta["size_bytes"] == sizes[digest]

    now = query(ip)
    assert now["token"] == first["token"] and now["buffer_ok"] is True
    assert now["requests"] == first["requests"] + 1
    assert _in_container(img_lab, "h2", "/bin/cat", "/etc/motd") == MOTD
    assert _in_container(img_lab, "h2", "/bin/cat", "/tmp/mark") == "written\n"
    upper = _state(img_lab, "h2") / "containers" / NAME / "upper"
    assert (upper / "tmp" / "mark").read_text() == "written\n"
    assert not (upper / "etc" / "motd").exists(), "a lower layer leaked into the upper dir"
    assert _held(img_lab, "h1") == h1_layers, "the source keeps its layers"

    # h2 -> h1, post-copy: h1 has both layers; not one layer byte moves.
    back = ferry(
        img_lab, "migrate", NAME, "--to", "h1", "--strategy", "post-copy", "--json",
        timeout=300,
    )  # fmt: skip
    assert back.code == 0, back.stderr
    record = back.json()
    assert record["state"] == "completed", record
    assert "all 2 layer(s) already here" in back.stderr
    facts = _prepare_span(img_lab, record["id"])
    assert facts["ferry.layers_fetched"] == 0 and facts["ferry.layers_present"] == 2
    assert facts["ferry.layer_bytes_fetched"] == 0
    assert _held(img_lab, "h1") == h1_layers, "h1's layers were fetched or unpacked again"
    assert _layer_fetches_logged(img_lab, "h1") == 2

    last = query(ip)
    assert last["token"] == first["token"] and last["buffer_ok"] is True
    assert _in_container(img_lab, "h1", "/bin/cat", "/etc/motd") == MOTD
    assert _in_container(img_lab, "h1", "/bin/cat", "/tmp/mark") == "written\n"

    assert ferry(img_lab, "container", "rm", NAME).code == 0
    # Layers outlive their containers: the next one starts without a fetch.
    assert set(_held(img_lab, "h1")) == set(layers) == set(_held(img_lab, "h2"))


def test_bad_image_input_exits_2_and_changes_nothing(
    img_lab: str, images: dict[str, Any], tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"
    (fresh / "etc").mkdir(parents=True)
    (fresh / "etc" / "fresh").write_text("never uploaded\n")
    before = (
        ferry(img_lab, "containers", "--json", check=True).json(),
        _image_ls(img_lab),
        _held(img_lab, "h1"),
        _held(img_lab, "h2"),
        asyncio.run(_store_objects(img_lab)),
    )
    run = ["container", "run", "--host", "h1", "--name", "x"]
    cases = [
        ([*run, "--image", "nosuch", "--", "/bin/sh"], "--image"),
        ([*run, "--rootfs", str(fresh), "--image", "app", "--", "/bin/sh"], "--image"),
        ([*run, "--image", "Bad Name!", "--", "/bin/sh"], "--image"),
        (["image", "build", str(fresh), "--name", "Bad Name!"], "--name"),
        (["image", "build", str(fresh), "--name", "x", "--base", "nosuch"], "--base"),
        (["image", "build", str(tmp_path / "missing"), "--name", "x"], "DIR"),
        (["image", "pull", "nosuch"], "NAME"),
        (["image", "pull", "app", "--host", "h9"], "--host"),
    ]
    for argv, argument in cases:
        got = ferry(img_lab, *argv)
        assert got.code == 2, (argv, got.stderr)
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and argument in lines[0], (argv, got.stderr)
    after = (
        ferry(img_lab, "containers", "--json", check=True).json(),
        _image_ls(img_lab),
        _held(img_lab, "h1"),
        _held(img_lab, "h2"),
        asyncio.run(_store_objects(img_lab)),
    )
    assert after == before
