"""The sending side of a transfer: `push` packs members and sends them, `push_presync`
sends a dir whole while it may still change and returns its manifest, `push_delta` sends
only what changed in it since, and `pull` fetches what the peer holds (the page files a
post-copy restore serves back). Each returns a `Sent` describing what crossed the wire.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from services.errors import FerryError, Forbidden, InvalidInput, RuntimeFailure
from services.retrying import transient
from services.runtime.proc import arun
from services.runtime.transfer import blocks
from services.runtime.transfer.auth import AUTH_FIELD, Link, sign, verify
from services.runtime.transfer.blocks import PATCHES, Signatures
from services.runtime.transfer.codec import IDENTITY, IO_TIMEOUT_S, _encode, _sha256, check_sizes
from services.runtime.transfer.manifest import (
    DELTA_INDEX,
    PAGES,
    TAR_FLAGS,
    DeltaIndex,
    Entry,
    Manifest,
    Member,
    _check_dirname,
    manifest,
    pack,
    plan_delta,
    unpack,
)
from services.runtime.transfer.wire import (
    DELTA_OF,
    LIVE,
    Progress,
    _check,
    _check_limit,
    _close,
    _connect,
    _header,
    _receive_payload,
    _send_file,
)


@dataclass(frozen=True)
class Sent:
    """One finished transfer. `bytes` crossed the wire; `sha256` is of the decoded tar."""

    bytes: int
    sha256: str
    seconds: float
    raw_bytes: int = 0  # the tar before encoding (equals `bytes` for "identity")
    encoding: str = IDENTITY
    entries: int = 0  # paths a presync or delta carried; 0 when not counted
    deleted: int = 0  # paths a delta removed on the receiver
    patched: int = 0  # files a delta sent as their changed blocks only
    # A presync's receiver: its large files' block hashes, for the deltas (blocks.py).
    signatures: Signatures = field(default_factory=dict)


async def _deliver(
    link: Link,
    migration_id: str,
    name: str,
    tar_path: Path,
    digest: tuple[int, str],
    *,
    damage: Callable[[], bool] | None,
    limit_bps: int | None,
    compress: bool,
    on_progress: Progress | None,
) -> Sent:
    """Send a packed tar to the peer's transfer service and wait for its verdict."""
    loop = asyncio.get_running_loop()
    raw_size, sha256 = digest
    wire, encoding = await _encode(tar_path, compress)
    size = wire.stat().st_size
    if damage is not None and damage():
        # Test-only fault: bytes change after the digest was taken, as on a bad link.
        with wire.open("r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff\x00\xff\x00")
    started = loop.time()
    reader, writer = await _connect(link)
    try:
        header: dict[str, object] = {"op": "push", "migration_id": migration_id, "name": name}
        header |= {"size": size, "sha256": sha256, "encoding": encoding, "raw_size": raw_size}
        header = sign(link.grant.secret, header)
        writer.write(json.dumps(header).encode() + b"\n")
        await _send_file(writer, wire, limit_bps=limit_bps, on_progress=on_progress)
        reply = await _header(reader)
    finally:
        await _close(writer)
    if not reply.get("ok"):
        raise _refusal(reply, f"peer refused the transfer of {name}")
    return Sent(
        bytes=size,
        sha256=sha256,
        seconds=loop.time() - started,
        raw_bytes=raw_size,
        encoding=encoding,
        signatures=_signatures(reply.get("signatures")),
    )


def _signatures(raw: object) -> dict[str, list[str]]:
    """A receiver's signatures, kept only if well formed: without them files go whole."""
    if not isinstance(raw, dict):
        return {}
    return {
        str(path): [str(h) for h in hashes]
        for path, hashes in raw.items()
        if isinstance(hashes, list) and all(isinstance(h, str) for h in hashes)
    }


def _refusal(reply: dict[str, object], what: str) -> FerryError:
    """The peer's refusal, typed: one on who we are is final, any other may pass."""
    if reply.get("kind") == Forbidden.kind:
        return Forbidden(f"{what}: {reply.get('error')}")
    if reply.get("kind") == InvalidInput.kind:  # what we sent is refused: again is no better
        return InvalidInput(f"{what}: {reply.get('error')}")
    return RuntimeFailure(f"{what}: {reply.get('error')}", retryable=True)


@transient
async def push(
    link: Link,
    migration_id: str,
    name: str,
    members: Sequence[Member],
    scratch: Path,
    damage: Callable[[], bool] | None = None,
    *,
    limit_bps: int | None = None,
    compress: bool = False,
    on_progress: Progress | None = None,
) -> Sent:
    """Send `members` to the peer, which unpacks them into migrations/<id>/incoming/<name>.

    `limit_bps` caps the wire rate; `compress` uses zstd (gzip without it); `on_progress`
    hears (bytes sent, bytes total) a few times a second. A "presync" may be of files in
    use; a "delta" goes with `push_delta`."""
    _check(migration_id, name)
    _check_limit(limit_bps)
    if name in DELTA_OF:
        raise InvalidInput("a delta is sent with push_delta", field="name")
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        digest = await pack(members, tar_path, live=name in LIVE)
        return await _deliver(
            link,
            migration_id,
            name,
            tar_path,
            digest,
            damage=damage,
            limit_bps=limit_bps,
            compress=compress,
            on_progress=on_progress,
        )


async def push_presync(
    link: Link,
    migration_id: str,
    base: Path,
    dirname: str,
    scratch: Path,
    *,
    limit_bps: int | None = None,
    compress: bool = False,
    on_progress: Progress | None = None,
    damage: Callable[[], bool] | None = None,
) -> tuple[Sent, Manifest]:
    """Send base/dirname whole while it may still change; return the manifest to give
    `push_delta` later. The manifest is taken before tar reads anything, so whatever
    changes during the send shows up in the delta."""
    _check_dirname(dirname)
    since = await asyncio.to_thread(manifest, base / dirname)
    sent = await push(
        link,
        migration_id,
        "presync",
        [Member(base, dirname)],
        scratch,
        damage,
        limit_bps=limit_bps,
        compress=compress,
        on_progress=on_progress,
    )
    return replace(sent, entries=len(since)), since


async def push_volumes(
    link: Link,
    migration_id: str,
    base: Path,
    names: Sequence[str],
    scratch: Path,
    *,
    limit_bps: int | None = None,
    compress: bool = False,
    on_progress: Progress | None = None,
) -> tuple[Sent, dict[str, Manifest]]:
    """Send the volume dirs base/<name> whole, in one transfer, while they may still
    change; return each one's manifest for its `push_delta(..., into="volumes")`."""
    for name in names:
        _check_dirname(name)
    since = {name: await asyncio.to_thread(manifest, base / name) for name in names}
    sent = await push(
        link,
        migration_id,
        "volumes",
        [Member(base, name) for name in names],
        scratch,
        limit_bps=limit_bps,
        compress=compress,
        on_progress=on_progress,
    )
    return replace(sent, entries=sum(len(m) for m in since.values())), since


@transient
async def push_delta(
    link: Link,
    migration_id: str,
    base: Path,
    dirname: str,
    since: Mapping[str, Sequence[object]],
    scratch: Path,
    *,
    limit_bps: int | None = None,
    compress: bool = False,
    on_progress: Progress | None = None,
    damage: Callable[[], bool] | None = None,
    into: str = "presync",
    signatures: Signatures | None = None,
) -> Sent:
    """Send what changed in base/dirname since the presync `since` described; the peer
    applies it over incoming/<into>/<dirname> ("presync" or "volumes"), which then equals
    base/dirname.

    Meant for a frozen dir. The same delta may be delivered again with the same result;
    a later delta must again be computed against the presync's `since`, and paths that
    only lived between two deltas are not removed by the second one. With the presync's
    `signatures` (its Sent's), a large changed file goes as its changed blocks only."""
    delta = next((d for d, whole in DELTA_OF.items() if whole == into), None)
    if delta is None:
        raise InvalidInput(f"no delta applies over {into!r}", field="into")
    _check(migration_id, delta)
    _check_dirname(dirname)
    _check_limit(limit_bps)
    now = await asyncio.to_thread(manifest, base / dirname)
    plan = plan_delta(since, now)
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "index").mkdir()
        patches = await asyncio.to_thread(
            _patches, base / dirname, dirname, plan.send, now, signatures or {},
            tmp / "index" / PATCHES,
        )  # fmt: skip
        index = DeltaIndex(
            dirname=dirname,
            remove=plan.remove,
            dirs=plan.dirs,
            entries=len(plan.send),
            deleted=plan.deleted,
            patches=patches,
        )
        (tmp / "index" / DELTA_INDEX).write_text(index.model_dump_json())
        patched = {p.path for p in patches}
        whole = [p for p in plan.send if p not in patched]
        names = [dirname if p == "." else f"{dirname}/{p}" for p in whole]
        (tmp / "names").write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
        tar_path = tmp / "delta.tar"
        argv = ["tar", *TAR_FLAGS, "--no-recursion", "-cf", str(tar_path)]
        argv += ["-C", str(tmp / "index"), DELTA_INDEX, *([PATCHES] if patches else [])]
        argv += ["-C", str(base)]
        argv += ["--null", "--verbatim-files-from", "-T", str(tmp / "names")]
        await arun(argv, timeout=IO_TIMEOUT_S)
        digest = tar_path.stat().st_size, await asyncio.to_thread(_sha256, tar_path)
        sent = await _deliver(
            link,
            migration_id,
            delta,
            tar_path,
            digest,
            damage=damage,
            limit_bps=limit_bps,
            compress=compress,
            on_progress=on_progress,
        )
    return replace(sent, entries=len(plan.send), deleted=plan.deleted, patched=len(patches))


def _patches(
    root: Path,
    dirname: str,
    send: Sequence[str],
    now: Mapping[str, Entry],
    signatures: Signatures,
    out: Path,
) -> tuple[blocks.Patch, ...]:
    """The changed large files the receiver has signatures of, as patches (their blocks
    into `out`, in order); the rest of `send` goes whole."""
    found = []
    with out.open("wb") as data:
        for rel in send:
            entry = now[rel]
            signature = signatures.get(f"{dirname}/{rel}")
            if signature is None or entry.kind != "f" or entry.nlink != 1:
                continue
            if entry.size < blocks.PATCH_MIN_BYTES:
                continue
            mark = data.tell()
            patch = blocks.diff(
                root / rel, signature, entry.mode, entry.uid, entry.gid, entry.mtime_ns, rel, data
            )
            if patch is None:
                data.seek(mark)
                data.truncate()
                continue
            found.append(patch)
    return tuple(found)


@transient
async def pull(
    link: Link,
    migration_id: str,
    name: str,
    into: Path,
    scratch: Path,
    *,
    limit_bps: int | None = None,
    compress: bool = False,
    on_progress: Progress | None = None,
) -> Sent:
    """Fetch what the peer holds for the migration under `name` and unpack it into `into`.
    The peer paces itself to `limit_bps` and compresses if asked; `on_progress` hears
    (bytes received, bytes total)."""
    _check(migration_id, name)
    _check_limit(limit_bps)
    loop = asyncio.get_running_loop()
    scratch.mkdir(parents=True, exist_ok=True)
    started = loop.time()
    reader, writer = await _connect(link)
    try:
        request: dict[str, object] = {"op": "pull", "migration_id": migration_id, "name": name}
        request |= {"limit_bps": limit_bps, "compress": compress}
        request = sign(link.grant.secret, request)
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        header = await _header(reader)
        if not header.get("ok"):
            raise _refusal(header, f"peer cannot send {name}")
        # The answer is signed too: pages are taken only from the host that holds the key.
        verify(link.grant.secret, {**header, "request": request[AUTH_FIELD]}, what="the reply")
        size, sha256 = check_sizes(header.get("size"))[0], str(header["sha256"])
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            tar_path = await _receive_payload(reader, header, Path(tmp), on_progress)
            raw_size = tar_path.stat().st_size
            await unpack(tar_path, into, policy=PAGES)
    finally:
        await _close(writer)
    return Sent(
        bytes=size,
        sha256=sha256,
        seconds=loop.time() - started,
        raw_bytes=raw_size,
        encoding=str(header.get("encoding", IDENTITY)),
    )
