"""Large files travel again only as their changed blocks.

A database rewrites pages of big files; a delta that resent each changed file whole put
them, whole, inside the freeze. So the receiver of a pre-sync hashes the large files it now
holds (their bytes as they landed, whatever a live tar read) and answers with those
signatures; a delta of the frozen dir then reads each changed large file, hashes its blocks
and sends only those whose hash differs, as a patch: the file's new size, the blocks'
numbers, their bytes (one `.ferry-patches` member of the delta), and the stat tar would
have restored. The receiver writes them into its copy. A file with extended attributes, hard
links, or no signature still travels whole.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from services.errors import InvalidInput

BLOCK = 64 << 10
PATCH_MIN_BYTES = 1 << 20  # smaller files go whole: a patch would save little
PATCHES = ".ferry-patches"  # the delta member holding every patch's blocks, in order
MAX_SIGNED_FILES = 100_000
Signatures = Mapping[str, Sequence[str]]
"""Path (relative to the received dir, its top dir first) -> each block's hash, in order."""


def _hash(data: bytes) -> str:
    # sha256, cut to 128 bits: the CPU's SHA extensions make it ~1 GB/s here, four times
    # blake2b's, and this runs inside the freeze (machine facts F32).
    return hashlib.sha256(data).hexdigest()[:32]


def _blocks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(BLOCK):
        yield chunk


def _open_regular(path: Path, flags: int) -> int:
    """An fd of a regular file at `path` itself (never through a link at its last part)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidInput(f"{path} is not a regular file")
    return fd


def file_signature(path: Path) -> list[str]:
    with os.fdopen(_open_regular(path, os.O_RDONLY), "rb") as f:
        return [_hash(block) for block in _blocks(f)]


def signatures(root: Path) -> dict[str, list[str]]:
    """The signatures of the large plain files under `root` (keys relative to it)."""
    found: dict[str, list[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    continue
                if st.st_size < PATCH_MIN_BYTES:
                    continue
                found[str(path.relative_to(root))] = file_signature(path)
            except (OSError, InvalidInput):
                continue  # gone or replaced meanwhile: it travels whole
            if len(found) >= MAX_SIGNED_FILES:
                return found
    return found


class Patch(BaseModel):
    """One file's changed blocks, and the stat the receiver gives it afterwards."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative to the delta's dir, as the plan's
    size: int = Field(ge=0)
    blocks: tuple[int, ...]
    mode: int = Field(ge=0, le=0o7777)
    uid: int = Field(ge=0)
    gid: int = Field(ge=0)
    mtime_ns: int

    def block_length(self, number: int) -> int:
        return max(0, min(BLOCK, self.size - number * BLOCK))


def diff(
    path: Path,
    signature: Sequence[str],
    entry_mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    rel: str,
    out: IO[bytes],
) -> Patch | None:
    """The patch that turns the receiver's copy (described by `signature`) into `path` as
    it is now; its blocks written to `out`. None: send it whole (it has extended attributes,
    or most of it changed anyway)."""
    fd = _open_regular(path, os.O_RDONLY)
    if os.listxattr(fd):
        os.close(fd)
        return None
    changed = []
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for number, block in enumerate(_blocks(f)):
            if number >= len(signature) or _hash(block) != signature[number]:
                changed.append(number)
                out.write(block)
    if len(changed) * BLOCK > size * 0.9:
        return None  # rewritten: whole is as small, and simpler
    return Patch(
        path=rel, size=size, blocks=tuple(changed), mode=entry_mode, uid=uid, gid=gid,
        mtime_ns=mtime_ns,
    )  # fmt: skip


def apply(path: Path, patch: Patch, data: IO[bytes], max_bytes: int) -> None:
    """Write `patch` into the receiver's copy at `path` (resolved inside the copy by the
    caller), then its size, owner, mode and mtime; drops extended attributes it no longer
    has on the sender (a patched file has none there)."""
    if patch.size > max_bytes:
        raise InvalidInput(f"a patch of {patch.path} makes it {patch.size} bytes")
    last = (patch.size + BLOCK - 1) // BLOCK
    if any(n >= last for n in patch.blocks) or list(patch.blocks) != sorted(set(patch.blocks)):
        raise InvalidInput(f"a patch of {patch.path} names blocks it does not have")
    fd = _open_regular(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, patch.size)
        for number in patch.blocks:
            length = patch.block_length(number)
            block = data.read(length)
            if len(block) != length:
                raise InvalidInput(f"the patch of {patch.path} is short")
            os.pwrite(fd, block, number * BLOCK)
        for attr in os.listxattr(fd):
            if not attr.startswith(("security.", "system.")):
                os.removexattr(fd, attr)
        os.fchown(fd, patch.uid, patch.gid)
        os.fchmod(fd, patch.mode)  # after chown, which clears set-id bits
        os.utime(fd, ns=(patch.mtime_ns, patch.mtime_ns))
    finally:
        os.close(fd)
