"""An image's layer, as the image stores it, made into a Ferry layer.

Three things happen to each layer, in this order, and a layer fails as a whole if any does:
1. Its bytes are checked while they are read: the stored blob against the digest the
   manifest names it by, the uncompressed tar against the config's `diff_id` (gzip and zstd
   are recognised by their magic numbers, not by the media type an archive claims), and it
   may not grow past MAX_LAYER_BYTES uncompressed (a decompression bomb stops there).
2. OCI's whiteouts become overlayfs's: `dir/.wh.name` a char device 0:0 named `dir/name`,
   `dir/.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on `dir` (what an overlay mount
   reads; the lower layers stay what they are). A whiteout for a name the same layer
   holds again is dropped (that entry replaces the lower one anyway; a directory is made
   opaque, so none of the lower directory's entries show through, as OCI says). Any
   `trusted.overlay.*` xattr the image brought itself is dropped: only Ferry says what an
   overlay hides. AUFS's own `.wh..wh.*` entries mean nothing to overlayfs and are skipped,
   as are device nodes and fifos under `dev/` (runc mounts a fresh /dev over them).
3. The converted tar passes the same tarcheck rules a layer passes on every host, before
   it is stored (`services.runtime.layers.LAYER`).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from services.errors import InvalidInput
from services.images.oci_source import LayerBlob
from services.runtime import tarcheck
from services.runtime.layers import LAYER, MAX_LAYER_BYTES, file_digest

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
AUFS_META = ".wh..wh."
OPAQUE_XATTR = "SCHILY.xattr.trusted.overlay.opaque"
XATTRS = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
OVERLAY_XATTRS = ("SCHILY.xattr.trusted.overlay.", "LIBARCHIVE.xattr.trusted.overlay.")


@dataclass(frozen=True)
class ConvertedLayer:
    """A Ferry layer tar made from an image's layer."""

    digest: str  # sha256 of the Ferry tar: its name in the layer store
    path: Path
    diff_id: str
    whiteouts: int
    opaque_dirs: int
    skipped: int  # AUFS entries and /dev nodes left out
    members: int


def _refused(blob: LayerBlob, why: str) -> InvalidInput:
    return InvalidInput(f"layer {blob.diff_id[:12]} ({blob.path}): {why}", field="PATH")


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _copy_counted(src: _Reader, out: IO[bytes], blob: LayerBlob) -> str:
    """Copy src to out and return the sha256 of what was copied; refuse more than
    MAX_LAYER_BYTES."""
    sha = hashlib.sha256()
    total = 0
    while chunk := src.read(CHUNK):
        total += len(chunk)
        if total > MAX_LAYER_BYTES:
            raise _refused(blob, f"larger than {MAX_LAYER_BYTES} bytes uncompressed")
        sha.update(chunk)
        out.write(chunk)
    return sha.hexdigest()


def _unzstd(blob: LayerBlob, compressed: Path, out: IO[bytes]) -> str:
    if shutil.which("zstd") is None:
        raise _refused(blob, "zstd-compressed, and zstd is not installed here")
    argv = ["zstd", "-q", "-d", "-c", str(compressed)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        try:
            digest = _copy_counted(proc.stdout, out, blob)
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise _refused(blob, f"its zstd stream is broken (zstd exited {proc.returncode})")
    return digest


def uncompressed(blob: LayerBlob, stored: IO[bytes], into: Path) -> Path:
    """The layer's plain tar at `into`, checked against both digests on the way."""
    compressed = into.with_suffix(".blob")
    with compressed.open("wb") as out:
        blob_hex = _copy_counted(stored, out, blob)
    if blob.blob_sha256 is not None and blob_hex != blob.blob_sha256:
        raise _refused(blob, f"its bytes hash to sha256:{blob_hex[:12]}, not its name")
    with compressed.open("rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC):
        with gzip.open(compressed, "rb") as src, into.open("wb") as out:
            try:
                diff_hex = _copy_counted(src, out, blob)
            except (OSError, EOFError, zlib.error) as exc:
                raise _refused(blob, f"its gzip stream is broken: {exc}") from None
    elif magic == ZSTD_MAGIC:
        with into.open("wb") as out:
            diff_hex = _unzstd(blob, compressed, out)
    else:  # a plain tar
        compressed.rename(into)
        diff_hex = file_digest(into)
    compressed.unlink(missing_ok=True)
    if diff_hex != blob.diff_id:
        raise _refused(blob, f"its tar hashes to sha256:{diff_hex[:12]}, not its diff_id")
    return into


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _split(name: str) -> tuple[str, str]:
    parent, _, base = name.rpartition("/")
    return parent, base


def _join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


class _Plan:
    """What a layer's first reading found: its names and which directories are opaque."""

    def __init__(self, members: list[tarfile.TarInfo]) -> None:
        self.kinds: dict[str, tarfile.TarInfo] = {}
        self.opaque: set[str] = set()
        for m in members:
            name = _norm(m.name)
            parent, base = _split(name)
            if base == OPAQUE:
                self.opaque.add(parent)
            elif not base.startswith(WHITEOUT):
                self.kinds[name] = m
        for m in members:  # a whiteout beside a new directory of that name: replace it whole
            parent, base = _split(_norm(m.name))
            if base.startswith(WHITEOUT) and base != OPAQUE:
                target = self.kinds.get(_join(parent, base[len(WHITEOUT) :]))
                if target is not None and target.isdir():
                    self.opaque.add(_join(parent, base[len(WHITEOUT) :]))


def _kept_xattrs(m: tarfile.TarInfo) -> dict[str, str]:
    """The member's xattrs, but none of overlayfs's: the rest of its pax headers (path,
    size, sparse maps) describe the member as stored, and tarfile writes those anew."""
    return {
        k: v
        for k, v in m.pax_headers.items()
        if k.startswith(XATTRS) and not k.startswith(OVERLAY_XATTRS)
    }


def _directory(name: str, opaque: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name or ".")
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    if opaque:
        info.pax_headers = {OPAQUE_XATTR: "y"}
    return info


def convert(blob: LayerBlob, plain_tar: Path, out: Path) -> ConvertedLayer:
    """Write the Ferry layer for an image layer's plain tar (see the module's docstring)."""
    whiteouts = skipped = 0
    try:  # closed by the `with` below
        src = tarfile.open(plain_tar, "r:", tarinfo=tarcheck.BoundedHeaderInfo)  # noqa: SIM115
    except tarfile.TarError as exc:
        raise _refused(blob, f"not a tar: {exc}") from None
    with src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        try:
            members = src.getmembers()
        except tarfile.TarError as exc:
            raise _refused(blob, f"its tar cannot be read: {exc}") from None
        plan = _Plan(members)
        add: Callable[[tarfile.TarInfo, IO[bytes] | None], None] = dst.addfile
        opaque_written: set[str] = set()
        for m in members:
            name = _norm(m.name)
            parent, base = _split(name)
            if base == OPAQUE:
                if parent not in plan.kinds and parent not in opaque_written:
                    add(_directory(parent, opaque=True), None)
                    opaque_written.add(parent)
                continue
            if base.startswith(AUFS_META):
                skipped += 1
                continue
            if base.startswith(WHITEOUT):
                hidden = _join(parent, base[len(WHITEOUT) :])
                if hidden in plan.kinds:
                    continue  # this layer holds the name again (a directory made opaque)
                info = tarfile.TarInfo(hidden)
                info.type = tarfile.CHRTYPE
                info.devmajor = info.devminor = 0
                info.mode = 0o600
                info.mtime = m.mtime
                add(info, None)
                whiteouts += 1
                continue
            if (m.ischr() or m.isblk() or m.isfifo()) and name.startswith("dev/"):
                skipped += 1
                continue
            info = tarfile.TarInfo(name or ".")
            for attr in ("mode", "uid", "gid", "size", "mtime", "type", "linkname"):
                setattr(info, attr, getattr(m, attr))
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = _kept_xattrs(m)
            if m.isdir() and name in plan.opaque:
                info.pax_headers[OPAQUE_XATTR] = "y"
                opaque_written.add(name)
            if m.isfile():
                info.type = tarfile.REGTYPE  # a sparse member arrives expanded
                data = src.extractfile(m)
                add(info, data)
            else:
                info.size = 0
                add(info, None)
    checked = tarcheck.check(out, LAYER)
    return ConvertedLayer(
        members=checked.members,
        digest=file_digest(out),
        path=out,
        diff_id=blob.diff_id,
        whiteouts=whiteouts,
        opaque_dirs=len(opaque_written),
        skipped=skipped,
    )
