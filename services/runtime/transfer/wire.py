"""The wire protocol, one message per connection: a JSON header line, then exactly `size`
bytes in the encoding the header names. Decoded, they are a tar whose sha256 the header
announces, and the receiver checks that digest before handing the tar on. This module
frames and validates headers, connects and closes, sends a payload paced by a token bucket
(`limit_bps`) while reporting progress, and receives one, decoded and verified. It knows
nothing of what the tar holds or of who pushes and who serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from schemas.v1.types import MIGRATION_ID
from services.errors import Forbidden, InvalidInput, RuntimeFailure
from services.runtime.transfer.auth import Link, check_peer
from services.runtime.transfer.codec import (
    CHUNK,
    ENCODINGS,
    IDENTITY,
    IO_TIMEOUT_S,
    _decode,
    _sha256,
    check_sizes,
)

NAMES = {"bundle", "pages", "presync", "delta", "volumes", "volume-delta"}
# A delta's name, by the whole transfer it applies over (incoming/<that name>/<dirname>).
DELTA_OF = {"delta": "presync", "volume-delta": "volumes"}
LIVE = {"presync", "volumes"}  # sent while the container runs: files may change under tar
CONNECT_TIMEOUT_S = 10.0

# Pacing. The bucket holds at most BURST_S of bytes and a send takes half of that, so the
# bytes sent in any window of W seconds stay below limit * (W + BURST_S): within +8% of the
# limit over any window of 0.25 s or more.
BURST_S = 0.02
PROGRESS_EVERY_S = 0.25  # on_progress is called at most this often, and once at the end

Progress = Callable[[int, int], Awaitable[None]]
"""Called with (bytes done, bytes total) while a payload moves."""


def _check(migration_id: str, name: str) -> None:
    if not MIGRATION_ID.match(migration_id):
        raise InvalidInput(f"bad migration id {migration_id!r}", field="migration_id")
    if name not in NAMES:
        raise InvalidInput(f"unknown transfer {name!r}", field="name")


def _check_limit(limit_bps: object) -> int | None:
    if limit_bps is None:
        return None
    if isinstance(limit_bps, bool) or not isinstance(limit_bps, int) or limit_bps < 1:
        raise InvalidInput(f"bad rate limit {limit_bps!r} (bytes/s, >= 1)", field="limit_bps")
    return limit_bps


class _TokenBucket:
    """Paces a sender to `rate` bytes/s, with bursts of at most BURST_S worth."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * BURST_S)
        self.chunk = max(1, min(CHUNK, int(self.capacity / 2)))
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class _Reporter:
    """Passes progress on at most every PROGRESS_EVERY_S, and always once at the end."""

    def __init__(self, report: Progress | None, total: int) -> None:
        self.report, self.total, self.last = report, total, -math.inf

    async def __call__(self, done: int) -> None:
        if self.report is None:
            return
        now = time.monotonic()
        if done >= self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            await self.report(done, self.total)


async def _send_file(
    writer: asyncio.StreamWriter,
    path: Path,
    *,
    limit_bps: int | None = None,
    on_progress: Progress | None = None,
) -> None:
    bucket = _TokenBucket(limit_bps) if limit_bps is not None else None
    size = bucket.chunk if bucket is not None else CHUNK
    report = _Reporter(on_progress, path.stat().st_size)
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(size):
            if bucket is not None:
                await bucket.take(len(chunk))
            writer.write(chunk)
            await writer.drain()
            done += len(chunk)
            await report(done)


async def _receive_file(
    reader: asyncio.StreamReader, size: int, out: Path, on_progress: Progress | None = None
) -> str:
    """Read exactly `size` bytes into `out`; return their sha256."""
    sha = hashlib.sha256()
    left = size
    report = _Reporter(on_progress, size)
    with out.open("wb") as f:
        while left:
            chunk = await asyncio.wait_for(reader.read(min(CHUNK, left)), IO_TIMEOUT_S)
            if not chunk:
                raise RuntimeFailure(
                    f"transfer cut short: {size - left} of {size} bytes", retryable=True
                )
            sha.update(chunk)
            f.write(chunk)
            left -= len(chunk)
            await report(size - left)
    return sha.hexdigest()


async def _receive_payload(
    reader: asyncio.StreamReader,
    header: Mapping[str, object],
    tmp: Path,
    on_progress: Progress | None = None,
) -> Path:
    """Read the payload the header announces and decode it; return the tar, verified. Sizes
    above the cap are refused before a byte is read."""
    size, raw_size = check_sizes(header.get("size"), header.get("raw_size"))
    sha256 = str(header["sha256"])
    encoding = str(header.get("encoding", IDENTITY))
    if encoding not in ENCODINGS:
        raise InvalidInput(f"unknown encoding {encoding!r}", field="encoding")
    wire = tmp / "payload.wire"
    digest = await _receive_file(reader, size, wire, on_progress)
    tar_path = wire
    if encoding != IDENTITY:
        # The digest covers the decoded tar, the bytes that get unpacked, not the wire bytes.
        tar_path = tmp / "payload.tar"
        await _decode(encoding, wire, tar_path, raw_size)
        wire.unlink()
        digest = await asyncio.to_thread(_sha256, tar_path)
    if digest != sha256:
        raise RuntimeFailure(
            f"transfer corrupted: sha256 {digest[:12]} != announced {sha256[:12]}",
            retryable=True,
        )
    return tar_path


async def _header(reader: asyncio.StreamReader) -> dict[str, object]:
    line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
    if not line:
        raise RuntimeFailure("peer closed the connection before answering", retryable=True)
    data = json.loads(line)
    if not isinstance(data, dict):
        raise RuntimeFailure("peer sent a malformed header")
    return data


async def _connect(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the peer's transfer service; over TLS, only to the host `link`
    names (its certificate is checked before a byte of ours goes out)."""
    where = f"the transfer service of {link.peer} at {link.address}:{link.port}"
    ssl_context = link.tls.client_context() if link.tls is not None else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(link.address, link.port, ssl=ssl_context), CONNECT_TIMEOUT_S
        )
    except ssl.SSLError as exc:
        raise Forbidden(f"TLS with {where} failed: {exc.reason or exc}") from exc
    except (OSError, TimeoutError) as exc:
        raise RuntimeFailure(f"cannot reach {where}: {exc}", retryable=True) from exc
    if ssl_context is not None:
        try:
            check_peer(writer.get_extra_info("peercert"), link.peer, what=where)
        except Forbidden:
            await _close(writer)
            raise
    return reader, writer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
