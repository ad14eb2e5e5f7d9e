"""How a tar travels: its bytes encoded for the wire ("identity", "gzip" or "zstd") and
decoded back, refusing a stream that does not decode to exactly the announced size, and
the sha256 that the receiver checks the decoded tar against. Files in, files out: it
knows nothing of tar contents, sockets or peers.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import zlib
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime.proc import arun

CHUNK = 1 << 20
IO_TIMEOUT_S = 120.0

IDENTITY, GZIP, ZSTD = "identity", "gzip", "zstd"
ENCODINGS = frozenset({IDENTITY, GZIP, ZSTD})
ZSTD_LEVEL = 3
GZIP_LEVEL = 3
GZIP_WBITS = 16 + zlib.MAX_WBITS  # the gzip container, as `gzip -d` reads it


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _gzip(src: Path, out: Path) -> None:
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    with src.open("rb") as f, out.open("wb") as g:
        while chunk := f.read(CHUNK):
            g.write(packer.compress(chunk))
        g.write(packer.flush())


def _gunzip(src: Path, out: Path, raw_size: int) -> None:
    unpacker = zlib.decompressobj(GZIP_WBITS)
    written = 0
    with src.open("rb") as f, out.open("wb") as g:
        while chunk := f.read(CHUNK):
            while chunk:
                data = unpacker.decompress(chunk, CHUNK)
                written += len(data)
                if written > raw_size:
                    raise zlib.error(f"more than the announced {raw_size} bytes")
                g.write(data)
                chunk = unpacker.unconsumed_tail
        if not unpacker.eof or unpacker.unused_data:
            raise zlib.error("the stream does not end where the payload does")


async def _encode(tar_path: Path, compress: bool) -> tuple[Path, str]:
    """The file to put on the wire, and its encoding: zstd if installed, else gzip."""
    if not compress:
        return tar_path, IDENTITY
    if shutil.which("zstd"):
        out = tar_path.with_name(tar_path.name + ".zst")
        argv = ["zstd", "-q", "-f", f"-{ZSTD_LEVEL}", "-T0", str(tar_path), "-o", str(out)]
        await arun(argv, timeout=IO_TIMEOUT_S)
        return out, ZSTD
    out = tar_path.with_name(tar_path.name + ".gz")
    await asyncio.to_thread(_gzip, tar_path, out)
    return out, GZIP


async def _decode(encoding: str, wire: Path, out: Path, raw_size: int) -> None:
    def corrupted(why: object) -> RuntimeFailure:
        return RuntimeFailure(
            f"transfer corrupted: cannot decode {encoding}: {why}", retryable=True
        )

    if encoding == GZIP:
        try:
            await asyncio.to_thread(_gunzip, wire, out, raw_size)
        except zlib.error as exc:
            raise corrupted(exc) from exc
    elif encoding == ZSTD:
        if shutil.which("zstd") is None:
            raise RuntimeFailure("cannot decode a zstd payload: zstd is not installed here")
        try:
            await arun(["zstd", "-q", "-d", "-f", str(wire), "-o", str(out)], timeout=IO_TIMEOUT_S)
        except RuntimeFailure as exc:
            raise corrupted(exc) from exc
    if out.stat().st_size != raw_size:
        raise corrupted(f"{out.stat().st_size} bytes, announced {raw_size}")
