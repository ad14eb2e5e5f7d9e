"""Root filesystems: content-addressed read-only layers plus a per-container upper dir.

Identical layers on every host and an overlay on top is what lets CRIU find files
byte-identical after a move (only the upper dir has to travel). A host keeps each layer
it has verified unpacked under its layers dir, `<digest>/`, beside `<digest>.json` (its
tar's size and when it was unpacked).

A layer is unpacked by GNU tar only after tarcheck read it as a container's root filesystem
(any symlink target, overlay whiteouts; no member below a symlink, no other device, no
fifo, hard links only to earlier members) of at most MAX_LAYER_BYTES. `pack_rootfs`
refuses what hosts would refuse, so a bad tree fails when it is packed, not when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tarfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure
from services.runtime import tarcheck
from services.runtime.proc import arun
from services.runtime.tarcheck import Policy

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
LOCK_POLL_S = 0.1
MAX_LAYER_BYTES = 16 << 30
UNPACK_TIMEOUT_S = 1800.0  # GNU tar writing a layer of MAX_LAYER_BYTES, on a slow disk
LAYER = Policy(
    "layer",
    container_links=True,
    whiteouts=True,
    fifos=False,  # an image is built, not run: nothing in it needs one
    setid=True,  # su, ping: the container's own
    top_links=True,  # lib -> usr/lib: the layer's root is the directory it is unpacked into
    max_bytes=MAX_LAYER_BYTES,
)


@dataclass(frozen=True)
class HeldLayer:
    """A layer this host holds verified and unpacked."""

    digest: str
    size_bytes: int
    unpacked_at: float


def pack_rootfs(rootfs: Path, out: Path, *, policy: Policy = LAYER) -> str:
    """Write `rootfs` as a tar with sorted entries, return the sha256 of the tar.

    Entries are sorted and owner names dropped, so the same tree gives the same digest. A
    tree that hosts would refuse to unpack (a device node, a fifo, too big) is refused here.
    """
    if not rootfs.is_dir():
        raise InvalidInput(f"{rootfs} is not a directory", field="--rootfs")

    def entries(top: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                yield Path(dirpath) / name

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in entries(rootfs):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False, filter=normalise)
    tarcheck.check(out, policy)
    return file_digest(out)


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def unpack_layer(tar_path: Path, digest: str, layers_dir: Path, *, policy: Policy = LAYER) -> Path:
    """Verify, check and unpack a layer tar into layers_dir/<digest>; atomic, idempotent.
    A layer that is not what its digest says may be fetched again (retryable); one that
    breaks tarcheck's rules or `policy`'s caps is refused for good (UnsafeArchive)."""
    final = layers_dir / digest
    if final.is_dir():
        return final
    size = tar_path.stat().st_size
    if size > policy.max_bytes:
        raise tarcheck.UnsafeArchive(
            f"layer {digest[:12]} is {size} bytes, above the cap of {policy.max_bytes}"
        )
    actual = file_digest(tar_path)
    if actual != digest:
        raise RuntimeFailure(
            f"layer {digest[:12]} arrived corrupted (sha256 {actual[:12]})", retryable=True
        )
    staging = layers_dir / f".{digest}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tarcheck.unpack(tar_path, staging, policy, timeout=UNPACK_TIMEOUT_S)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    meta = {"size_bytes": size, "unpacked_at": time.time()}
    meta_path = layers_dir / f"{digest}.json"
    meta_path.with_suffix(".json.tmp").write_text(json.dumps(meta))
    meta_path.with_suffix(".json.tmp").rename(meta_path)
    staging.rename(final)
    return final


def held_layers(layers_dir: Path) -> list[HeldLayer]:
    """Every layer unpacked under layers_dir, oldest first (a half-unpacked one is not)."""
    found: list[HeldLayer] = []
    if not layers_dir.is_dir():
        return found
    for path in layers_dir.iterdir():
        if not DIGEST_RE.match(path.name) or not path.is_dir():
            continue
        try:
            meta = json.loads((layers_dir / f"{path.name}.json").read_text())
            size, at = int(meta["size_bytes"]), float(meta["unpacked_at"])
        except (OSError, ValueError, KeyError, TypeError):  # unpacked before sizes were kept
            size = sum(p.lstat().st_size for p in path.rglob("*"))
            at = path.stat().st_mtime
        found.append(HeldLayer(digest=path.name, size_bytes=size, unpacked_at=at))
    return sorted(found, key=lambda layer: (layer.unpacked_at, layer.digest))


@contextlib.asynccontextmanager
async def layer_lock(layers_dir: Path, digest: str) -> AsyncIterator[None]:
    """One fetch of `digest` at a time on this host, across every worker process."""
    layers_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(layers_dir / f".{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def overlay_options(lowers: Sequence[Path], upper: Path, work: Path) -> str:
    """Mount options for layers given lowest first: overlayfs wants the uppermost first."""
    if not lowers:
        raise RuntimeFailure("an overlay needs at least one lower layer")
    lowerdir = ":".join(str(p) for p in reversed(lowers))
    return f"lowerdir={lowerdir},upperdir={upper},workdir={work}"


async def mount_overlay(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount the layers (lowest first) read-only under a writable upper dir at `target`."""
    options = overlay_options(lowers, upper, work)
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(target):
        return
    await arun(["mount", "-t", "overlay", "overlay", "-o", options, str(target)])


async def unmount(target: Path) -> None:
    if os.path.ismount(target):
        await arun(["umount", "--lazy", str(target)])
