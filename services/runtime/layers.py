"""Root filesystems: a content-addressed read-only layer plus a per-container upper dir.

Identical layers on every host and an overlay on top is what lets CRIU find files
byte-identical after a move (only the upper dir has to travel).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure
from services.runtime.proc import arun

CHUNK = 1 << 20


def pack_rootfs(rootfs: Path, out: Path) -> str:
    """Write `rootfs` as a tar with sorted entries, return the sha256 of the tar.

    Entries are sorted and owner names dropped, so the same tree gives the same digest.
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
    return file_digest(out)


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _safe_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise RuntimeFailure(f"layer holds an unsafe path: {member.name!r}")
        yield member


def unpack_layer(tar_path: Path, digest: str, layers_dir: Path) -> Path:
    """Verify and unpack a layer tar into layers_dir/<digest>; atomic, idempotent."""
    final = layers_dir / digest
    if final.is_dir():
        return final
    actual = file_digest(tar_path)
    if actual != digest:
        raise RuntimeFailure(
            f"layer {digest[:12]} arrived corrupted (sha256 {actual[:12]})", retryable=True
        )
    staging = layers_dir / f".{digest}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(tar_path) as tar:
        # The tar was packed by an operator's own CLI; ownership, modes and device
        # nodes must come through unchanged, so only the paths are policed.
        if hasattr(tarfile, "fully_trusted_filter"):  # Python >= 3.11.4 asks for a filter
            tar.extractall(staging, members=_safe_members(tar), filter="fully_trusted")
        else:
            tar.extractall(staging, members=_safe_members(tar))
    staging.rename(final)
    return final


async def mount_overlay(lower: Path, upper: Path, work: Path, target: Path) -> None:
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(target):
        return
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    await arun(["mount", "-t", "overlay", "overlay", "-o", options, str(target)])


async def unmount(target: Path) -> None:
    if os.path.ismount(target):
        await arun(["umount", "--lazy", str(target)])
