"""Root filesystem layers: reproducible digests, verified and atomic unpacking."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from services.errors import InvalidInput, RuntimeFailure
from services.runtime.layers import pack_rootfs, unpack_layer


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
