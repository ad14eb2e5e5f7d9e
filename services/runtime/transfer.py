"""Moving files between hosts over plain TCP, sha256-checked end to end.

Each host's transfer worker serves this on its own address. A message is one JSON header
line, then exactly `size` bytes of a tar stream whose sha256 the header announces; the
receiver checks it before anything lands in place. GNU tar carries what an overlay upper
dir needs (whiteout devices, opaque-dir xattrs, hard links, sparse files).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.errors import InvalidInput, RuntimeFailure
from services.retrying import transient
from services.runtime.proc import arun

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]
MIGRATION_ID = re.compile(r"^[0-9a-f]{8,64}$")
NAMES = {"bundle", "pages"}
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Member:
    """A path to send, and the name it gets inside the transfer."""

    base: Path
    name: str


@dataclass(frozen=True)
class Sent:
    bytes: int
    sha256: str
    seconds: float


def _check(migration_id: str, name: str) -> None:
    if not MIGRATION_ID.match(migration_id):
        raise InvalidInput(f"bad migration id {migration_id!r}", field="migration_id")
    if name not in NAMES:
        raise InvalidInput(f"unknown transfer {name!r}", field="name")


def migration_dir(state_dir: Path, migration_id: str) -> Path:
    return state_dir / "migrations" / migration_id


async def pack(members: Sequence[Member], out: Path) -> tuple[int, str]:
    """Tar `members` into `out`; return its size and sha256."""
    argv = ["tar", *TAR_FLAGS, "-cf", str(out)]
    for m in members:
        argv += ["-C", str(m.base), m.name]
    await arun(argv, timeout=IO_TIMEOUT_S)
    return out.stat().st_size, await asyncio.to_thread(_sha256, out)


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


async def unpack(tar_path: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    await arun(["tar", *TAR_FLAGS, "-xpf", str(tar_path), "-C", str(into)], timeout=IO_TIMEOUT_S)


async def _send_file(writer: asyncio.StreamWriter, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            writer.write(chunk)
            await writer.drain()


async def _receive_file(reader: asyncio.StreamReader, size: int, sha256: str, out: Path) -> None:
    sha = hashlib.sha256()
    left = size
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
    if sha.hexdigest() != sha256:
        raise RuntimeFailure(
            f"transfer corrupted: sha256 {sha.hexdigest()[:12]} != announced {sha256[:12]}",
            retryable=True,
        )


async def _header(reader: asyncio.StreamReader) -> dict[str, object]:
    line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
    if not line:
        raise RuntimeFailure("peer closed the connection before answering", retryable=True)
    data = json.loads(line)
    if not isinstance(data, dict):
        raise RuntimeFailure("peer sent a malformed header")
    return data


async def _connect(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise RuntimeFailure(
            f"cannot reach the transfer service at {address}:{port}: {exc}", retryable=True
        ) from exc


@transient
async def push(
    address: str,
    port: int,
    migration_id: str,
    name: str,
    members: Sequence[Member],
    scratch: Path,
    damage: Callable[[], bool] | None = None,
) -> Sent:
    """Send `members` to the peer, which unpacks them into migrations/<id>/incoming/<name>."""
    _check(migration_id, name)
    loop = asyncio.get_running_loop()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        size, sha256 = await pack(members, tar_path)
        if damage is not None and damage():
            # Test-only fault: bytes change after the digest was taken, as on a bad link.
            with tar_path.open("r+b") as f:
                f.seek(size // 2)
                f.write(b"\xff\x00\xff\x00")
        started = loop.time()
        reader, writer = await _connect(address, port)
        try:
            header = {"op": "push", "migration_id": migration_id, "name": name}
            writer.write(json.dumps({**header, "size": size, "sha256": sha256}).encode() + b"\n")
            await _send_file(writer, tar_path)
            reply = await _header(reader)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    if not reply.get("ok"):
        raise RuntimeFailure(f"peer refused the transfer: {reply.get('error')}", retryable=True)
    return Sent(bytes=size, sha256=sha256, seconds=loop.time() - started)


@transient
async def pull(
    address: str, port: int, migration_id: str, name: str, into: Path, scratch: Path
) -> Sent:
    """Fetch what the peer holds for the migration under `name` and unpack it into `into`."""
    _check(migration_id, name)
    loop = asyncio.get_running_loop()
    scratch.mkdir(parents=True, exist_ok=True)
    started = loop.time()
    reader, writer = await _connect(address, port)
    try:
        writer.write(
            json.dumps({"op": "pull", "migration_id": migration_id, "name": name}).encode() + b"\n"
        )
        await writer.drain()
        header = await _header(reader)
        if not header.get("ok"):
            raise RuntimeFailure(f"peer cannot send {name}: {header.get('error')}")
        size, sha256 = int(str(header["size"])), str(header["sha256"])
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            tar_path = Path(tmp) / f"{name}.tar"
            await _receive_file(reader, size, sha256, tar_path)
            await unpack(tar_path, into)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return Sent(bytes=size, sha256=sha256, seconds=loop.time() - started)


class TransferServer:
    """Serves pushes into, and pulls out of, this host's migration directories."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    async def serve(self, address: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, address, port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header_text = "no header"
        try:
            header = await _header(reader)
            header_text = f"migration {header.get('migration_id')} {header.get('name')}"
            migration_id, name = str(header.get("migration_id")), str(header.get("name"))
            _check(migration_id, name)
            if header.get("op") == "push":
                await self._receive(reader, writer, header, migration_id, name)
            elif header.get("op") == "pull":
                await self._send(writer, migration_id, name)
            else:
                raise InvalidInput(f"unknown op {header.get('op')!r}")
        except Exception as exc:
            log.warning("transfer request failed: %s (%s)", exc, header_text)
            with contextlib.suppress(Exception):
                writer.write(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    async def _receive(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        header: dict[str, object],
        migration_id: str,
        name: str,
    ) -> None:
        incoming = migration_dir(self.state_dir, migration_id) / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        final = incoming / name
        partial = incoming / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=incoming) as tmp:
            tar_path = Path(tmp) / f"{name}.tar"
            await _receive_file(reader, int(str(header["size"])), str(header["sha256"]), tar_path)
            await unpack(tar_path, partial)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        writer.write(json.dumps({"ok": True}).encode() + b"\n")
        await writer.drain()
        log.info("received %s for %s (%s bytes)", name, migration_id, header["size"])

    async def _send(self, writer: asyncio.StreamWriter, migration_id: str, name: str) -> None:
        images = migration_dir(self.state_dir, migration_id) / "images"
        files = sorted(p.name for p in images.glob("page*.img")) if images.is_dir() else []
        if name != "pages" or not files:
            raise RuntimeFailure(f"no {name} held for migration {migration_id}")
        with tempfile.TemporaryDirectory(dir=images.parent) as tmp:
            tar_path = Path(tmp) / "pages.tar"
            size, sha256 = await pack([Member(images, f) for f in files], tar_path)
            writer.write(json.dumps({"ok": True, "size": size, "sha256": sha256}).encode() + b"\n")
            await _send_file(writer, tar_path)
        log.info("sent %d page files back for %s (%d bytes)", len(files), migration_id, size)
