"""The receiving side of a transfer, served by each host's transfer worker: it takes
pushes only into migrations this host has prepared, from the source each names, signed
with the migration's key (over mutual TLS where the host has certificates). It unpacks
each push beside its final place and swaps it in (or applies a delta over the presync
copy), one writer per migration at a time, and serves a migration's page files back to
its source, paced and compressed as asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path

from services.errors import FerryError, InvalidInput, RuntimeFailure, Unavailable
from services.runtime.paths import MigrationPaths
from services.runtime.proc import arun
from services.runtime.transfer import auth
from services.runtime.transfer.auth import (
    AUTH_FIELD,
    TlsFiles,
    TransferGrant,
    check_peer,
    sign,
    verify,
)
from services.runtime.transfer.blocks import signatures
from services.runtime.transfer.codec import IDENTITY, IO_TIMEOUT_S, _encode
from services.runtime.transfer.manifest import (
    FILES,
    TAR_FLAGS,
    UPPER,
    VOLUMES,
    DeltaIndex,
    Member,
    _apply_patches,
    _prepare_delta,
    _read_index,
    pack,
    unpack,
)
from services.runtime.transfer.wire import (
    DELTA_OF,
    LIVE,
    _check,
    _check_limit,
    _header,
    _receive_payload,
    _send_file,
)

# The package's logger, as before the split into modules: log filters keep matching.
log = logging.getLogger(__package__)

# A peer that connects must say what it wants quickly; transfers at once are bounded, so a
# flood of connections cannot exhaust the host (each one may hold a file being written).
HEADER_TIMEOUT_S = 10.0
POLICIES = {"bundle": FILES, "volumes": VOLUMES}  # the rest: a container's upper dir
MAX_CONNECTIONS = 32


def _peer(writer: asyncio.StreamWriter) -> str:
    address = writer.get_extra_info("peername")
    return f"{address[0]}:{address[1]}" if address else "an unknown peer"


class TransferServer:
    """Serves pushes into, and pulls out of, this host's migration directories, to the
    source each migration names only (services/runtime/transfer/auth.py). `limit_bps` caps
    what it sends back, whatever a puller asks for; `tls` makes the port mutual TLS."""

    def __init__(
        self,
        state_dir: Path,
        *,
        limit_bps: int | None = None,
        tls: TlsFiles | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.state_dir = state_dir
        self.limit_bps = _check_limit(limit_bps)
        self.tls = tls
        self.max_connections = max_connections
        self._open = 0
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def serve(self, address: str, port: int) -> asyncio.Server:
        ssl_context = self.tls.server_context() if self.tls is not None else None
        return await asyncio.start_server(
            self._handle,
            address,
            port,
            reuse_address=True,
            ssl=ssl_context,
            ssl_handshake_timeout=HEADER_TIMEOUT_S if ssl_context else None,
        )

    def _lock(self, migration_id: str) -> asyncio.Lock:
        """One writer at a time into a migration's incoming dir (a delta edits in place)."""
        lock = self._locks.get(migration_id)
        if lock is None:
            lock = self._locks[migration_id] = asyncio.Lock()
        return lock

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header_text = "no header"
        self._open += 1
        try:
            if self._open > self.max_connections:
                raise Unavailable(f"busy: {self.max_connections} transfers at once already")
            header = await asyncio.wait_for(_header(reader), HEADER_TIMEOUT_S)
            header_text = f"migration {header.get('migration_id')} {header.get('name')}"
            migration_id, name = str(header.get("migration_id")), str(header.get("name"))
            _check(migration_id, name)
            grant = self._grant(migration_id, writer)
            verify(grant.secret, header, what=f"a request for {name} of {migration_id}")
            if header.get("op") == "push":
                await self._receive(reader, writer, header, migration_id, name)
            elif header.get("op") == "pull":
                asked = _check_limit(header.get("limit_bps"))
                limits = [x for x in (asked, self.limit_bps) if x is not None]
                await self._send(
                    writer,
                    grant,
                    str(header[AUTH_FIELD]),
                    name,
                    limit_bps=min(limits, default=None),
                    compress=header.get("compress") is True,
                )
            else:
                raise InvalidInput(f"unknown op {header.get('op')!r}")
        except Exception as exc:
            log.warning(
                "transfer request failed: %s (%s, from %s)", exc, header_text, _peer(writer)
            )
            kind = exc.kind if isinstance(exc, FerryError) else "failed"
            with contextlib.suppress(Exception):
                refusal = {"ok": False, "error": str(exc), "kind": kind}
                writer.write(json.dumps(refusal).encode() + b"\n")
                await writer.drain()
        finally:
            self._open -= 1
            writer.close()

    def _grant(self, migration_id: str, writer: asyncio.StreamWriter) -> TransferGrant:
        """The key this host issued for the migration, if the peer is its source."""
        grant = auth.load(MigrationPaths.of(self.state_dir, migration_id).root)
        if grant is None or grant.side != "issued":
            raise RuntimeFailure(
                f"migration {migration_id} is not prepared on this host (or was discarded)"
            )
        if self.tls is not None:
            check_peer(
                writer.get_extra_info("peercert"),
                grant.peer,
                what=f"only {grant.peer} may transfer for migration {migration_id}",
            )
        return grant

    async def _receive(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        header: dict[str, object],
        migration_id: str,
        name: str,
    ) -> None:
        paths = MigrationPaths.of(self.state_dir, migration_id)
        incoming = paths.incoming
        try:
            # Never recreate a migration's directory: a push that arrives after the
            # destination was discarded (a retry still in flight) must not leave files.
            incoming.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise RuntimeFailure(
                f"migration {migration_id} is not prepared on this host (or was discarded)"
            ) from None
        what = f"{header['size']} bytes, {header.get('encoding', IDENTITY)}"
        reply: dict[str, object] = {"ok": True}
        with tempfile.TemporaryDirectory(dir=incoming) as tmp:
            tar_path = await _receive_payload(reader, header, Path(tmp))
            async with self._lock(migration_id):
                if name in DELTA_OF:
                    over = incoming / DELTA_OF[name]
                    index = await self._apply_delta(tar_path, over, migration_id)
                    what += f", {index.entries} entries, {index.deleted} deleted"
                    what += f", {len(index.patches)} patched" if index.patches else ""
                else:
                    final = incoming / name
                    partial = incoming / f".{name}.partial"
                    shutil.rmtree(partial, ignore_errors=True)
                    await unpack(tar_path, partial, policy=POLICIES.get(name, UPPER))
                    shutil.rmtree(final, ignore_errors=True)
                    partial.rename(final)
                    if name in LIVE:  # what its deltas may send as changed blocks only
                        reply["signatures"] = await asyncio.to_thread(signatures, final)
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        log.info("received %s for %s (%s)", name, migration_id, what)

    async def _apply_delta(self, tar_path: Path, presync: Path, migration_id: str) -> DeltaIndex:
        """Removals first, then the changed entries unpacked over the presync copy. Each
        step converges, so a redelivered (or half-applied) delta ends the same."""
        index = await asyncio.to_thread(_read_index, tar_path)
        root = presync / index.dirname
        if root.is_symlink() or not root.is_dir():
            raise RuntimeFailure(
                f"no presync of {index.dirname} held for migration {migration_id}: "
                "a delta has nothing to apply to"
            )
        await asyncio.to_thread(_prepare_delta, root, index)
        if index.entries > len(index.patches):
            argv = ["tar", *TAR_FLAGS, "-xpf", str(tar_path), "-C", str(presync), index.dirname]
            await arun(argv, timeout=IO_TIMEOUT_S)
        await asyncio.to_thread(_apply_patches, root, index, tar_path)
        return index

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        grant: TransferGrant,
        request_mac: str,
        name: str,
        *,
        limit_bps: int | None = None,
        compress: bool = False,
    ) -> None:
        migration_id = grant.migration_id
        images = MigrationPaths.of(self.state_dir, migration_id).images
        files = sorted(p.name for p in images.glob("page*.img")) if images.is_dir() else []
        if name != "pages" or not files:
            raise RuntimeFailure(f"no {name} held for migration {migration_id}")
        with tempfile.TemporaryDirectory(dir=images.parent) as tmp:
            tar_path = Path(tmp) / "pages.tar"
            raw_size, sha256 = await pack([Member(images, f) for f in files], tar_path)
            wire, encoding = await _encode(tar_path, compress)
            size = wire.stat().st_size
            header: dict[str, object] = {"ok": True, "size": size, "sha256": sha256}
            header |= {"encoding": encoding, "raw_size": raw_size, "request": request_mac}
            header = sign(grant.secret, header)
            writer.write(json.dumps(header).encode() + b"\n")
            await _send_file(writer, wire, limit_bps=limit_bps)
        log.info("sent %d page files back for %s (%d bytes)", len(files), migration_id, size)
