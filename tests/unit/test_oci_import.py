"""OCI and Docker images made into Ferry layers: found, digest-checked, whiteouts converted.

The images come from the real tools (umoci builds a two-layer image, skopeo copies it into
an OCI archive and a Docker archive); the converted layers are mounted with the kernel's own
overlayfs, so "the way overlayfs expects" is judged by overlayfs. Layouts written here by
hand hold what the tools never write: opaque-directory markers, an image's own overlay
xattrs, broken digests, unsafe names.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.errors import InvalidInput
from services.images import oci_import
from services.images.oci_import import ImportedImage
from services.runtime import tarcheck
from services.runtime.layers import mount_overlay, unmount, unpack_layer


def _quiet(*argv: str, cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def umoci_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`img:t`: layer 1 has /etc/gone and /etc/d/x; layer 2 deletes /etc/gone and replaces
    /etc/d by a directory holding only y. Config: user, env, workdir, entrypoint, cmd,
    port, label."""
    top = tmp_path_factory.mktemp("umoci")
    _quiet("umoci", "init", "--layout", "img", cwd=top)
    _quiet("umoci", "new", "--image", "img:t", cwd=top)
    _quiet("umoci", "unpack", "--image", "img:t", "bundle", cwd=top)
    rootfs = top / "bundle" / "rootfs"
    (rootfs / "etc" / "d").mkdir(parents=True)
    (rootfs / "etc" / "gone").write_text("a\n")
    (rootfs / "etc" / "d" / "x").write_text("b\n")
    (rootfs / "bin").mkdir()
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    _quiet("umoci", "repack", "--image", "img:t", "bundle", cwd=top)
    shutil.rmtree(top / "bundle")
    _quiet("umoci", "unpack", "--image", "img:t", "bundle", cwd=top)
    (rootfs / "etc" / "gone").unlink()
    shutil.rmtree(rootfs / "etc" / "d")
    (rootfs / "etc" / "d").mkdir()
    (rootfs / "etc" / "d" / "y").write_text("c\n")
    _quiet("umoci", "repack", "--image", "img:t", "bundle", cwd=top)
    _quiet(
        "umoci", "config", "--image", "img:t", "--config.user", "1000:1000",
        "--config.env", "FOO=bar", "--config.workingdir", "/tmp",
        "--config.entrypoint", "/bin/busybox", "--config.cmd", "sh",
        "--config.exposedports", "80/tcp", "--config.label", "team=db", cwd=top,
    )  # fmt: skip
    return top / "img"


def _convert(path: Path, tmp: Path, ref: str | None = None) -> ImportedImage:
    work = tmp / f"work-{len(list(tmp.iterdir()))}"
    work.mkdir()
    return oci_import.convert_image(path, ref, work, lambda _: None)


def _members(tar_path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return {m.name.rstrip("/"): m for m in tar.getmembers()}


@contextlib.contextmanager
def _mounted(layers: list[Path], tmp: Path) -> Iterator[Path]:
    """The layers (lowest first) unpacked as a host unpacks them, under a real overlay
    (root: the tests asking for it take `lab_capable`, which fails in CI without it)."""
    held = tmp / "held"
    lowers = []
    for tar_path in layers:
        digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
        lowers.append(unpack_layer(tar_path, digest, held))
    target = tmp / "merged"
    asyncio.run(mount_overlay(lowers, tmp / "upper", tmp / "work", target))
    try:
        yield target
    finally:
        asyncio.run(unmount(target))


def test_a_layout_and_both_archives_give_the_same_layers_and_config(
    umoci_image: Path, tmp_path: Path
) -> None:
    oci_archive, docker_archive = tmp_path / "oci.tar", tmp_path / "docker.tar"
    _quiet("skopeo", "copy", f"oci:{umoci_image}:t", f"oci-archive:{oci_archive}:t", cwd=tmp_path)
    _quiet(
        "skopeo", "copy", f"oci:{umoci_image}:t", f"docker-archive:{docker_archive}:t:latest",
        cwd=tmp_path,
    )  # fmt: skip
    found = [_convert(p, tmp_path) for p in (umoci_image, oci_archive, docker_archive)]

    assert len({tuple(c.digest for c in image.layers) for image in found}) == 1
    assert [image.ref for image in found] == ["t", "t", "docker.io/library/t:latest"]
    config = found[0].config
    assert config == found[1].config == found[2].config
    assert config.user == "1000:1000"
    assert config.env == ("FOO=bar",)
    assert config.working_dir == "/tmp"
    assert (config.entrypoint, config.cmd) == (("/bin/busybox",), ("sh",))
    assert config.exposed_ports == ("80/tcp",)
    assert config.labels == {"team": "db"}
    top = _members(found[0].layers[1].path)
    assert top["etc/gone"].ischr() and (top["etc/gone"].devmajor, top["etc/gone"].devminor) == (
        0,
        0,
    )
    assert not any(".wh." in name for name in top)


def test_overlayfs_sees_what_the_image_says(
    umoci_image: Path, tmp_path: Path, lab_capable: None
) -> None:
    image = _convert(umoci_image, tmp_path)
    with _mounted([layer.path for layer in image.layers], tmp_path) as root:
        assert not (root / "etc" / "gone").exists()
        assert sorted(os.listdir(root / "etc" / "d")) == ["y"]
        assert (root / "bin" / "busybox").stat().st_mode & 0o111


# ---- hand-made layouts ----------------------------------------------------------------------


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def _dir(name: str, **pax: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.pax_headers = dict(pax)
    return info


def _layout(
    root: Path,
    layers: list[bytes],
    *,
    env: list[str] | None = None,
    corrupt_blob: bool = False,
    wrong_diff_id: bool = False,
    tags: tuple[str, ...] = ("t",),
) -> Path:
    """An OCI layout of gzip layers, written the way the spec says (or broken on purpose)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    descriptors, diff_ids = [], []
    for plain in layers:
        packed = gzip.compress(plain, mtime=0)
        digest = put(packed)
        if corrupt_blob:
            (blobs / digest.split(":")[1]).write_bytes(packed[:-8] + b"\0" * 8)
        descriptors.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
             "size": len(packed)}
        )  # fmt: skip
        diff_ids.append(
            f"sha256:{hashlib.sha256(plain + (b'x' if wrong_diff_id else b'')).hexdigest()}"
        )
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Env": env or ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }  # fmt: skip
    config_bytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config_bytes), "size": len(config_bytes)},
        "layers": descriptors,
    }  # fmt: skip
    manifest_bytes = json.dumps(manifest).encode()
    manifest_digest = put(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
             "size": len(manifest_bytes),
             "annotations": {"org.opencontainers.image.ref.name": tag}}
            for tag in tags
        ],
    }  # fmt: skip
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


LOWER = _tar([_dir("d"), ("d/old", b"old\n"), ("keep", b"k\n")])


def test_an_opaque_directory_hides_the_lower_one_whole(tmp_path: Path, lab_capable: None) -> None:
    upper = _tar([("d/.wh..wh..opq", b""), ("d/new", b"new\n")])
    image = _convert(_layout(tmp_path / "img", [LOWER, upper]), tmp_path)
    assert image.layers[1].opaque_dirs == 1
    with _mounted([layer.path for layer in image.layers], tmp_path) as root:
        assert sorted(os.listdir(root / "d")) == ["new"]
        assert (root / "keep").read_text() == "k\n"


def test_an_images_own_overlay_xattrs_are_dropped(tmp_path: Path) -> None:
    sneaky = _tar([
        _dir("d", **{"SCHILY.xattr.trusted.overlay.redirect": "/etc",
                     "SCHILY.xattr.user.note": "kept"}),
    ])  # fmt: skip
    image = _convert(_layout(tmp_path / "img", [LOWER, sneaky]), tmp_path)
    headers = _members(image.layers[1].path)["d"].pax_headers
    assert "SCHILY.xattr.trusted.overlay.redirect" not in headers
    assert headers.get("SCHILY.xattr.user.note") == "kept"


def test_a_blob_that_is_not_what_its_digest_says_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not its name") as caught:
        _convert(_layout(tmp_path / "img", [LOWER], corrupt_blob=True), tmp_path)
    assert caught.value.field == "PATH"


def test_a_layer_that_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not its diff_id"):
        _convert(_layout(tmp_path / "img", [LOWER], wrong_diff_id=True), tmp_path)


def test_a_layer_writing_outside_its_root_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("d")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    with pytest.raises(tarcheck.UnsafeArchive, match="below the symlink"):
        _convert(_layout(tmp_path / "img", [_tar([link, ("d/passwd", b"x")])]), tmp_path)


def test_an_env_entry_ferry_cannot_set_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"Env\.0") as caught:
        _convert(_layout(tmp_path / "img", [LOWER], env=["NOEQUALS"]), tmp_path)
    assert caught.value.field == "PATH"


def test_several_images_need_a_ref_and_a_wrong_one_lists_the_tags(tmp_path: Path) -> None:
    layout = _layout(tmp_path / "img", [LOWER], tags=("a", "b"))
    with pytest.raises(InvalidInput, match=r"2 images \(a, b\)") as caught:
        _convert(layout, tmp_path)
    assert caught.value.field == "--ref"
    with pytest.raises(InvalidInput, match=r"tags: a, b"):
        _convert(layout, tmp_path, ref="c")
    assert _convert(layout, tmp_path, ref="b").ref == "b"


def test_not_an_image_at_all_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="neither an OCI image layout"):
        _convert(tmp_path / "empty", tmp_path)
