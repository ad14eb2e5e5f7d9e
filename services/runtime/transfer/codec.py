"""How a tar travels: its bytes encoded for the wire ("identity", "gzip" or "zstd") and
decoded back, refusing a stream that does not decode to exactly the announced size, and
the sha256 that the receiver checks the decoded tar against. Files in, files out: it
knows nothing of tar contents, sockets or peers.

Sizes are bounded: a header announcing more than MAX_TRANSFER_BYTES on the wire or decoded
is refused before a byte is read (`check_sizes`), and decoding stops as soon as it passes
the announced size, whatever the encoding (gzip's output is counted here; zstd's file may
not grow past it: the kernel's file size limit on the zstd process).
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import signal
import zlib
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure
from services.runtime.proc import arun

CHUNK = 1 << 20
IO_TIMEOUT_S = 120.0
MAX_TRANSFER_BYTES = 64 << 30  # one payload, on the wire and decoded: a container's files

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


def check_sizes(
    size: object, raw_size: object = None, *, cap: int = MAX_TRANSFER_BYTES
) -> tuple[int, int]:
    """A header's `size` (bytes on the wire) and `raw_size` (the decoded tar; absent for
    "identity": the same), as integers; refused (InvalidInput naming the field) unless
    each is a whole number from 0 to `cap`. Call it before reading the payload."""
    checked = []
    for field, value in (("size", size), ("raw_size", size if raw_size is None else raw_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"bad {field} {value!r} (bytes, >= 0)", field=field)
        if value > cap:
            raise InvalidInput(
                f"{field} {value} bytes is above the cap of {cap} ({cap / (1 << 30):.1f} GiB)",
                field=field,
            )
        checked.append(value)
    return checked[0], checked[1]


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


def _corrupted(encoding: str, why: object) -> RuntimeFailure:
    return RuntimeFailure(f"transfer corrupted: cannot decode {encoding}: {why}", retryable=True)


async def _unzstd(wire: Path, out: Path, raw_size: int) -> None:
    """`zstd -d` into `out`, which the kernel keeps to `raw_size` bytes (RLIMIT_FSIZE, set
    by prlimit): a stream that decodes to more kills zstd there, at full speed otherwise."""
    argv = ["prlimit", f"--fsize={raw_size}:{raw_size}", "zstd", "-q", "-d", "-f", str(wire)]
    done = await arun([*argv, "-o", str(out)], timeout=IO_TIMEOUT_S, check=False)
    if done.returncode == -signal.SIGXFSZ or "File too large" in done.stderr:
        raise _corrupted(ZSTD, f"more than the announced {raw_size} bytes")
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise _corrupted(ZSTD, f"zstd exited {done.returncode}: {said}")


async def _decode(
    encoding: str, wire: Path, out: Path, raw_size: int, *, cap: int = MAX_TRANSFER_BYTES
) -> None:
    check_sizes(wire.stat().st_size, raw_size, cap=cap)
    if encoding == GZIP:
        try:
            await asyncio.to_thread(_gunzip, wire, out, raw_size)
        except zlib.error as exc:
            raise _corrupted(encoding, exc) from exc
    elif encoding == ZSTD:
        if shutil.which("zstd") is None:
            raise RuntimeFailure("cannot decode a zstd payload: zstd is not installed here")
        await _unzstd(wire, out, raw_size)
    if out.stat().st_size != raw_size:
        raise _corrupted(encoding, f"{out.stat().st_size} bytes, announced {raw_size}")
