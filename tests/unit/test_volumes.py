"""Volumes: the spec's mounts and their checks, the config.json bind mounts, a host's
volume directory (made from the image, taken in, discarded only as a move's own), and two
volumes pre-synced and their deltas sent over a real TransferServer on loopback."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.v1.containers import ContainerSpec, CreateContainer, VolumeMount
from services.errors import Conflict, InvalidInput, NotFound, RuntimeFailure
from services.runtime import bundle
from services.runtime.transfer import RACY_NS, push_delta, push_volumes
from services.runtime.volumes import HostVolumes
from tests.unit.test_transfer import Peer, peer, snapshot  # noqa: F401  (the fixture)
from workflows.container_process import OptionError, parse_volume

DIGEST = "a" * 64


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("var/lib", "pattern"),
        ("/", "pattern"),
        ("/a/../etc", "plain path"),
        ("/a/./b", "plain path"),
        ("/a//b", "plain path"),
        ("/data/", "plain path"),
        ("/proc/sys", "inside /proc"),
        ("/dev", "inside /proc"),
        ("/a:b", "pattern"),
    ],
)
def test_a_mount_path_that_escapes_or_lands_on_the_kernels_is_refused(path: str, why: str) -> None:
    with pytest.raises(ValidationError) as caught:
        VolumeMount(name="data", path=path)
    assert why in str(caught.value)


def test_volumes_need_spec_version_3_and_are_distinct() -> None:
    mount = VolumeMount(name="data", path="/var/lib/mysql")
    with pytest.raises(ValidationError, match="volumes needs spec_version 3"):
        ContainerSpec(spec_version=2, layers=(DIGEST,), args=("x",), volumes=(mount,))
    twice = (mount, VolumeMount(name="data", path="/other"))
    with pytest.raises(ValidationError, match="volume name 'data' appears twice"):
        ContainerSpec(spec_version=3, layers=(DIGEST,), args=("x",), volumes=twice)
    same_path = (mount, VolumeMount(name="logs", path="/var/lib/mysql"))
    with pytest.raises(ValidationError, match="volume path '/var/lib/mysql' appears twice"):
        ContainerSpec(spec_version=3, layers=(DIGEST,), args=("x",), volumes=same_path)


def test_a_request_without_volumes_still_makes_a_version_2_spec() -> None:
    plain = CreateContainer(name="web", layers=(DIGEST,), args=("x",))
    assert plain.spec(user=None).spec_version == 2
    mount = VolumeMount(name="data", path="/srv", readonly=True)
    with_volume = CreateContainer(name="web", layers=(DIGEST,), args=("x",), volumes=(mount,))
    assert with_volume.spec(user=None).spec_version == 3
    assert with_volume.spec(user=None).volumes == (mount,)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("data:/srv", ("data", "/srv", False)), ("data:/srv:ro", ("data", "/srv", True))],
)
def test_the_volume_option_parses(text: str, parsed: tuple[str, str, bool]) -> None:
    assert parse_volume(text) == parsed


@pytest.mark.parametrize("text", ["data", ":/srv", "data:", "data:/srv:rx", "a:/b:ro:x"])
def test_a_malformed_volume_option_names_the_option(text: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_volume(text)
    assert caught.value.field == "--volume"


def test_the_config_bind_mounts_each_volume_and_reads_them_back(tmp_path: Path) -> None:
    volumes_dir = tmp_path / "volumes"
    spec = ContainerSpec(
        spec_version=3,
        layers=(DIGEST,),
        args=("x",),
        volumes=(
            VolumeMount(name="db", path="/var/lib/db"),
            VolumeMount(name="cfg", path="/etc/app", readonly=True),
        ),
    )
    sources = {"db": volumes_dir / "db" / "data", "cfg": volumes_dir / "cfg" / "data"}
    config = bundle.oci_config(
        spec,
        volume_sources=sources,
        hostname="web",
        netns_path=tmp_path / "ns",
        cgroups_path="/f/web",
    )
    binds = [m for m in config["mounts"] if m["type"] == "bind"]
    assert [(m["destination"], m["source"]) for m in binds] == [
        ("/var/lib/db", str(sources["db"])),
        ("/etc/app", str(sources["cfg"])),
    ]
    assert "rw" in binds[0]["options"] and "ro" in binds[1]["options"]
    bundle.write_config(tmp_path, config)
    assert bundle.volume_names(tmp_path, volumes_dir) == ["db", "cfg"]
    assert bundle.volume_names(tmp_path / "nothing", volumes_dir) == []
    with pytest.raises(RuntimeFailure, match="no host directory for volume"):
        bundle.oci_config(
            spec, volume_sources={}, hostname="web", netns_path=tmp_path, cgroups_path="/f"
        )


def image_with_datadir(rootfs: Path) -> None:
    datadir = rootfs / "var" / "lib" / "db"
    datadir.mkdir(parents=True)
    (datadir / "ibdata1").write_bytes(b"x" * 4096)
    os.chown(datadir, 999, 999)
    os.chown(datadir / "ibdata1", 999, 999)
    datadir.chmod(0o750)
    (rootfs / "var" / "link").symlink_to("/etc")


def test_a_new_volume_starts_with_what_the_image_has_at_its_path(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    image_with_datadir(rootfs)
    volumes = HostVolumes(tmp_path / "volumes")
    assert volumes.create(VolumeMount(name="db", path="/var/lib/db"), rootfs) is True
    data = volumes.data("db")
    assert (data / "ibdata1").read_bytes() == b"x" * 4096
    st = data.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (999, 999, 0o750)
    assert (data / "ibdata1").stat().st_uid == 999
    # made once: the second container run finds it as it was left
    (data / "ibdata1").write_bytes(b"changed")
    assert volumes.create(VolumeMount(name="db", path="/var/lib/db"), rootfs) is False
    assert (data / "ibdata1").read_bytes() == b"changed"
    # a path the image lacks: an empty volume
    assert volumes.create(VolumeMount(name="empty", path="/srv/new"), rootfs) is True
    assert list(volumes.data("empty").iterdir()) == []
    assert volumes.names() == ["db", "empty"]
    assert [v.name for v in volumes.list()] == ["db", "empty"]


def test_a_path_through_a_link_in_the_image_is_refused_and_nothing_is_made(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    image_with_datadir(rootfs)
    volumes = HostVolumes(tmp_path / "volumes")
    with pytest.raises(InvalidInput, match="symbolic link"):
        volumes.create(VolumeMount(name="etc", path="/var/link/ssl"), rootfs)
    assert volumes.names() == []


def test_a_moves_copy_is_taken_in_once_and_discarded_only_by_that_move(tmp_path: Path) -> None:
    volumes = HostVolumes(tmp_path / "volumes")
    arrived = tmp_path / "incoming" / "db"
    (arrived / "data").mkdir(parents=True)
    (arrived / "data" / "f").write_text("rows")
    volumes.refuse_existing(["db"], "m-1")
    volumes.adopt("db", arrived, "m-1")
    volumes.adopt("db", arrived, "m-1")  # a redelivered restore finds it done
    assert (volumes.data("db") / "f").read_text() == "rows"
    with pytest.raises(RuntimeFailure, match="already holds a volume named 'db'"):
        volumes.refuse_existing(["db"], "m-2")
    with pytest.raises(Conflict):
        volumes.adopt("db", arrived, "m-2")
    assert volumes.discard_arrived("db", "m-2") is False  # another move's: kept
    assert volumes.exists("db")
    assert volumes.discard_arrived("db", "m-1") is True
    assert not volumes.exists("db") and volumes.names() == []


def test_a_volume_made_here_is_never_a_moves_to_discard(tmp_path: Path) -> None:
    volumes = HostVolumes(tmp_path / "volumes")
    volumes.create(VolumeMount(name="db", path="/srv"), tmp_path / "rootfs")
    assert volumes.discard_arrived("db", "m-1") is False
    assert volumes.remove("db") >= 0
    with pytest.raises(NotFound):
        volumes.remove("db")


async def test_two_volumes_presync_and_delta_leave_equal_trees(
    tmp_path: Path,
    peer: Peer,  # noqa: F811
) -> None:
    base, scratch, mid = tmp_path / "volumes", tmp_path / "scratch", peer.prepared()
    for name in ("db", "logs"):
        (base / name / "data" / "sub").mkdir(parents=True)
        (base / name / "data" / "sub" / "a").write_bytes(os.urandom(64 << 10))
        (base / name / "data" / "gone").write_text("old")
        (base / name / "volume.json").write_text(json.dumps({"created_at": 1.0}))
    await asyncio.sleep(RACY_NS / 1e9 + 0.1)
    sent, since = await push_volumes(peer.link(mid), mid, base, ["db", "logs"], scratch)
    there = peer.incoming(mid, "volumes")
    assert sorted(since) == ["db", "logs"] and sent.entries == sum(len(m) for m in since.values())
    assert all(snapshot(there / n) == snapshot(base / n) for n in ("db", "logs"))

    (base / "db" / "data" / "sub" / "a").write_bytes(os.urandom(64 << 10))  # rewritten
    (base / "db" / "data" / "gone").unlink()
    (base / "db" / "data" / "new").write_text("row")
    since_json = json.loads(json.dumps(since))
    deltas = [
        await push_delta(peer.link(mid), mid, base, n, since_json[n], scratch, into="volumes")
        for n in ("db", "logs")
    ]
    assert all(snapshot(there / n) == snapshot(base / n) for n in ("db", "logs"))
    # sub/a and new, and their parents (whose mtimes tar sets back): ., data, data/sub
    assert (deltas[0].entries, deltas[0].deleted) == (5, 1)
    assert (deltas[1].entries, deltas[1].deleted) == (0, 0)  # nothing changed: nothing sent
    with pytest.raises(InvalidInput, match="no delta applies over"):
        await push_delta(peer.link(mid), mid, base, "db", since_json["db"], scratch, into="bundle")


async def test_a_large_file_changed_in_place_goes_as_its_changed_blocks(
    tmp_path: Path,
    peer: Peer,  # noqa: F811
) -> None:
    """A database's page writes: a 4 MiB file with two 64 KiB blocks rewritten, another
    grown, another shrunk, one with an xattr (whole), a small one (whole)."""
    base, scratch, mid = tmp_path / "volumes", tmp_path / "scratch", peer.prepared()
    data = base / "db" / "data"
    data.mkdir(parents=True)
    files = {n: os.urandom(4 << 20) for n in ("ibdata1", "grows", "shrinks", "tagged")}
    for name, content in files.items():
        (data / name).write_bytes(content)
    os.setxattr(data / "tagged", "user.ferry", b"1")
    (data / "small").write_bytes(b"s" * 1000)
    (data / "ibdata1").chmod(0o640)
    await asyncio.sleep(RACY_NS / 1e9 + 0.1)
    sent, since = await push_volumes(peer.link(mid), mid, base, ["db"], scratch)
    assert set(sent.signatures) == {f"db/data/{n}" for n in files}  # the large files

    with (data / "ibdata1").open("r+b") as f:
        for offset in (0, 3 << 20):
            f.seek(offset + 100)
            f.write(os.urandom(10_000))
    with (data / "grows").open("ab") as f:
        f.write(os.urandom(200_000))
    os.truncate(data / "shrinks", (1 << 20) + 5)
    with (data / "tagged").open("r+b") as f:
        f.write(b"changed")
    (data / "small").write_bytes(b"t" * 1000)
    os.chown(data / "ibdata1", 999, 999)
    (data / "ibdata1").chmod(0o600)
    delta = await push_delta(
        peer.link(mid), mid, base, "db", json.loads(json.dumps(since["db"])), scratch,
        into="volumes", signatures=sent.signatures,
    )  # fmt: skip
    there = peer.incoming(mid, "volumes") / "db"
    assert snapshot(there) == snapshot(base / "db")
    assert delta.patched == 3  # ibdata1, grows, shrinks; tagged and small whole
    assert delta.bytes < (4 << 20) + (1 << 20), "the rewritten blocks, not 16 MiB of files"


def test_a_patch_naming_blocks_past_its_size_or_a_link_is_refused(tmp_path: Path) -> None:
    from io import BytesIO

    from services.runtime.transfer.blocks import BLOCK, Patch, apply

    target = tmp_path / "f"
    target.write_bytes(b"x" * (2 * BLOCK))
    beyond = Patch(path="f", size=BLOCK, blocks=(1,), mode=0o644, uid=0, gid=0, mtime_ns=0)
    with pytest.raises(InvalidInput, match="names blocks it does not have"):
        apply(target, beyond, BytesIO(b"y" * BLOCK), 1 << 30)
    (tmp_path / "link").symlink_to(target)
    fine = Patch(path="link", size=BLOCK, blocks=(0,), mode=0o644, uid=0, gid=0, mtime_ns=0)
    with pytest.raises(OSError):
        apply(tmp_path / "link", fine, BytesIO(b"y" * BLOCK), 1 << 30)
    assert target.read_bytes() == b"x" * (2 * BLOCK), "nothing written through the link"
