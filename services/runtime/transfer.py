"""Moving files between hosts over plain TCP, sha256-checked end to end.

Each host's transfer worker serves this on its own address. A message is one JSON header
line, then exactly `size` bytes in the encoding the header names ("identity", "gzip" or
"zstd"). Decoded, they are a tar stream whose sha256 the header announces; the receiver
checks that digest before anything lands in place. GNU tar carries what an overlay upper
dir needs (whiteout devices, opaque-dir xattrs, hard links, sparse files).

A sender can pace itself (a token bucket, `limit_bps`), compress, and report progress.
An overlay upper dir can travel twice: whole while the container still runs ("presync"),
then, after the freeze, only what changed since ("delta"), applied over the presync copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import weakref
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.errors import InvalidInput, RuntimeFailure
from services.retrying import transient
from services.runtime.proc import arun

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]
MIGRATION_ID = re.compile(r"^[0-9a-f]{8,64}$")
NAMES = {"bundle", "pages", "presync", "delta"}
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 120.0

# Pacing. The bucket holds at most BURST_S of bytes and a send takes half of that, so the
# bytes sent in any window of W seconds stay below limit * (W + BURST_S): within +8% of the
# limit over any window of 0.25 s or more.
BURST_S = 0.02
PROGRESS_EVERY_S = 0.25  # on_progress is called at most this often, and once at the end

IDENTITY, GZIP, ZSTD = "identity", "gzip", "zstd"
ENCODINGS = frozenset({IDENTITY, GZIP, ZSTD})
ZSTD_LEVEL = 3
GZIP_LEVEL = 3
GZIP_WBITS = 16 + zlib.MAX_WBITS  # the gzip container, as `gzip -d` reads it

# A stat taken within this long of a change may not see a later change of the same size:
# the file's timestamps tick coarsely (a jiffy; a second on some filesystems). Such entries
# are marked racy in the presync manifest and always sent again in the delta.
RACY_NS = 1_000_000_000
DELTA_INDEX = ".ferry-delta.json"  # the delta's first tar member, beside <dirname>/
DIRNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

Progress = Callable[[int, int], Awaitable[None]]
"""Called with (bytes done, bytes total) while a payload moves."""


@dataclass(frozen=True)
class Member:
    """A path to send, and the name it gets inside the transfer."""

    base: Path
    name: str


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


class Entry(NamedTuple):
    """One path of a manifest: what a cheap stat says about it, no content hashing."""

    kind: str  # f file, d dir, l symlink, c/b device, p fifo
    size: int  # of files and symlinks; 0 for the rest
    mtime_ns: int
    ctime_ns: int  # moves on chmod, chown, xattr and link changes, where mtime does not
    mode: int
    uid: int
    gid: int
    nlink: int  # a new or dropped hard link changes every name of the inode
    target: str  # a symlink's target, a device's "major:minor", else ""
    racy: bool  # changed too close to the walk to trust: always sent again


Manifest = dict[str, Entry]
"""Relative path ("." for the root itself) -> Entry."""

_KINDS = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
}  # no sockets: tar cannot carry them, and whoever binds one makes it anew


@dataclass(frozen=True)
class DeltaPlan:
    """What a delta carries, computed from two manifests of the same dir."""

    send: tuple[str, ...]  # sorted, so parents come before their children
    remove: tuple[str, ...]  # outermost paths gone or of another type now: removed first
    dirs: tuple[str, ...]  # directories in `send`: the receiver drops their old xattrs
    deleted: int  # paths gone since the presync


def _safe_rel(path: str) -> bool:
    parts = path.split("/")
    return "\0" not in path and all(p not in ("", ".", "..") for p in parts)


class DeltaIndex(BaseModel):
    """The delta's first tar member: where it applies, and what goes before unpacking."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1] = 1
    dirname: str = Field(pattern=DIRNAME.pattern)
    remove: tuple[str, ...] = ()
    dirs: tuple[str, ...] = ()
    entries: int = Field(ge=0)
    deleted: int = Field(ge=0)

    @field_validator("remove")
    @classmethod
    def _relative(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for p in paths:
            if not _safe_rel(p):
                raise ValueError(f"unsafe path {p!r}")
        return paths

    @field_validator("dirs")
    @classmethod
    def _relative_or_root(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for p in paths:
            if p != "." and not _safe_rel(p):
                raise ValueError(f"unsafe path {p!r}")
        return paths


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


def _check_dirname(dirname: str) -> None:
    if not DIRNAME.match(dirname):
        raise InvalidInput(f"bad directory name {dirname!r}", field="dirname")


def migration_dir(state_dir: Path, migration_id: str) -> Path:
    return state_dir / "migrations" / migration_id


async def pack(members: Sequence[Member], out: Path, *, live: bool = False) -> tuple[int, str]:
    """Tar `members` into `out`; return its size and sha256.

    `live`: the files may change while tar reads them (a presync of a running container).
    Tar's "file changed as we read it" is then expected: the delta sends such files again,
    as their ctime moved after the manifest was taken."""
    quiet = ["--warning=no-file-changed", "--warning=no-file-removed", "--warning=no-file-shrank"]
    argv = ["tar", *TAR_FLAGS, *(quiet if live else []), "-cf", str(out)]
    for m in members:
        argv += ["-C", str(m.base), m.name]
    done = await arun(argv, timeout=IO_TIMEOUT_S, check=not live)
    if done.returncode not in (0, 1):  # 1: some files differ, which `live` allows
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"tar exited {done.returncode}: {said}", log_tail=done.stderr)
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


# --- manifests and deltas -------------------------------------------------------------


def _entry(path: str, st: os.stat_result, racy_after_ns: int) -> Entry | None:
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    if kind == "l":
        target = os.readlink(path)
    elif kind in ("c", "b"):
        target = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    else:
        target = ""
    return Entry(
        kind=kind,
        size=st.st_size if kind in ("f", "l") else 0,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
        target=target,
        racy=st.st_ctime_ns > racy_after_ns,
    )


def manifest(root: Path) -> Manifest:
    """Every entry under `root` (and "." for root itself), from lstat alone. Entries that
    vanish during the walk are left out: the dir may belong to a running container."""
    racy_after_ns = time.time_ns() - RACY_NS
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{root} is not a directory", field="root")
    top = _entry(str(root), st, racy_after_ns)
    assert top is not None
    found: Manifest = {".": top}
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        path, prefix = stack.pop()
        try:
            listing = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with listing:
            for item in listing:
                try:
                    entry = _entry(item.path, item.stat(follow_symlinks=False), racy_after_ns)
                except FileNotFoundError:
                    continue
                if entry is None:
                    continue
                rel = prefix + item.name
                found[rel] = entry
                if entry.kind == "d":
                    stack.append((item.path, rel + "/"))
    return dict(sorted(found.items()))


def _parent(rel: str) -> str:
    return rel.rpartition("/")[0] or "."


def _outermost(paths: Iterable[str]) -> list[str]:
    """`paths` without those below another of them (removing the outer one removes them)."""
    chosen: set[str] = set()
    for p in sorted(paths):
        if not any(str(a) in chosen for a in PurePosixPath(p).parents):
            chosen.add(p)
    return sorted(chosen)


def plan_delta(since: Mapping[str, Sequence[object]], now: Mapping[str, Entry]) -> DeltaPlan:
    """What to send so that a copy of the dir as `since` saw it becomes the dir as `now`.

    `since` may have been through JSON (lists for tuples). Besides the changed and new
    entries, the parents of every changed or removed path travel too: unpacking or
    removing on the receiver moves those parents' mtimes, and tar sets them back."""
    try:
        old = {p: Entry._make(v) for p, v in since.items()}
    except TypeError as exc:
        raise InvalidInput(f"not a manifest: {exc}", field="since") from exc
    changed = {p for p, e in now.items() if p not in old or old[p].racy or old[p][:-1] != e[:-1]}
    retyped = {p for p in changed if p in old and old[p].kind != now[p].kind}
    gone = old.keys() - now.keys()
    parents = {_parent(p) for p in changed | gone if p != "."} & now.keys()
    send = tuple(sorted(changed | parents))
    return DeltaPlan(
        send=send,
        remove=tuple(_outermost(gone | retyped)),
        dirs=tuple(p for p in send if now[p].kind == "d"),
        deleted=len(gone),
    )


def _inside(root: Path, rel: str) -> Path | None:
    """root/rel if every directory on the way is a real one (no symlink is followed)."""
    path = root
    for part in rel.split("/")[:-1]:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    return path / rel.split("/")[-1]


def _prepare_delta(root: Path, index: DeltaIndex) -> None:
    """Remove what is gone or changed type, and drop the xattrs of the directories about
    to be unpacked over (tar adds xattrs to an existing directory but never removes any)."""
    for rel in index.remove:
        path = _inside(root, rel)
        if path is None:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    for rel in index.dirs:
        path = root if rel == "." else _inside(root, rel)
        if path is None or path.is_symlink() or not path.is_dir():
            continue
        for attr in os.listxattr(path, follow_symlinks=False):
            try:
                os.removexattr(path, attr, follow_symlinks=False)
            except OSError:
                if not attr.startswith(("security.", "system.")):  # the kernel's, not ours
                    raise


def _read_index(tar_path: Path) -> DeltaIndex:
    try:
        with tarfile.open(tar_path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != DELTA_INDEX or not first.isfile():
                raise InvalidInput(f"a delta must start with {DELTA_INDEX}")
            data = tar.extractfile(first)
            assert data is not None
            return DeltaIndex.model_validate_json(data.read())
    except (tarfile.TarError, ValidationError) as exc:
        raise InvalidInput(f"malformed delta: {exc}") from exc


# --- encoding -------------------------------------------------------------------------


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


# --- the wire -------------------------------------------------------------------------


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
    """Read the payload the header announces and decode it; return the tar, verified."""
    size, sha256 = int(str(header["size"])), str(header["sha256"])
    encoding = str(header.get("encoding", IDENTITY))
    if encoding not in ENCODINGS:
        raise InvalidInput(f"unknown encoding {encoding!r}", field="encoding")
    wire = tmp / "payload.wire"
    digest = await _receive_file(reader, size, wire, on_progress)
    tar_path = wire
    if encoding != IDENTITY:
        # The digest covers the decoded tar, the bytes that get unpacked, not the wire bytes.
        tar_path = tmp / "payload.tar"
        await _decode(encoding, wire, tar_path, int(str(header["raw_size"])))
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


async def _connect(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise RuntimeFailure(
            f"cannot reach the transfer service at {address}:{port}: {exc}", retryable=True
        ) from exc


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _deliver(
    address: str,
    port: int,
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
    reader, writer = await _connect(address, port)
    try:
        header: dict[str, object] = {"op": "push", "migration_id": migration_id, "name": name}
        header |= {"size": size, "sha256": sha256, "encoding": encoding, "raw_size": raw_size}
        writer.write(json.dumps(header).encode() + b"\n")
        await _send_file(writer, wire, limit_bps=limit_bps, on_progress=on_progress)
        reply = await _header(reader)
    finally:
        await _close(writer)
    if not reply.get("ok"):
        raise RuntimeFailure(f"peer refused the transfer: {reply.get('error')}", retryable=True)
    return Sent(
        bytes=size,
        sha256=sha256,
        seconds=loop.time() - started,
        raw_bytes=raw_size,
        encoding=encoding,
    )


@transient
async def push(
    address: str,
    port: int,
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
    if name == "delta":
        raise InvalidInput("a delta is sent with push_delta", field="name")
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        tar_path = Path(tmp) / f"{name}.tar"
        digest = await pack(members, tar_path, live=name == "presync")
        return await _deliver(
            address,
            port,
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
    address: str,
    port: int,
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
        address,
        port,
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


@transient
async def push_delta(
    address: str,
    port: int,
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
) -> Sent:
    """Send what changed in base/dirname since the presync `since` described; the peer
    applies it over incoming/presync/<dirname>, which then equals base/dirname.

    Meant for a frozen dir. The same delta may be delivered again with the same result;
    a later delta must again be computed against the presync's `since`, and paths that
    only lived between two deltas are not removed by the second one."""
    _check(migration_id, "delta")
    _check_dirname(dirname)
    _check_limit(limit_bps)
    now = await asyncio.to_thread(manifest, base / dirname)
    plan = plan_delta(since, now)
    index = DeltaIndex(
        dirname=dirname,
        remove=plan.remove,
        dirs=plan.dirs,
        entries=len(plan.send),
        deleted=plan.deleted,
    )
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "index").mkdir()
        (tmp / "index" / DELTA_INDEX).write_text(index.model_dump_json())
        names = [dirname if p == "." else f"{dirname}/{p}" for p in plan.send]
        (tmp / "names").write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
        tar_path = tmp / "delta.tar"
        argv = ["tar", *TAR_FLAGS, "--no-recursion", "-cf", str(tar_path)]
        argv += ["-C", str(tmp / "index"), DELTA_INDEX, "-C", str(base)]
        argv += ["--null", "--verbatim-files-from", "-T", str(tmp / "names")]
        await arun(argv, timeout=IO_TIMEOUT_S)
        digest = tar_path.stat().st_size, await asyncio.to_thread(_sha256, tar_path)
        sent = await _deliver(
            address,
            port,
            migration_id,
            "delta",
            tar_path,
            digest,
            damage=damage,
            limit_bps=limit_bps,
            compress=compress,
            on_progress=on_progress,
        )
    return replace(sent, entries=len(plan.send), deleted=plan.deleted)


@transient
async def pull(
    address: str,
    port: int,
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
    reader, writer = await _connect(address, port)
    try:
        request: dict[str, object] = {"op": "pull", "migration_id": migration_id, "name": name}
        request |= {"limit_bps": limit_bps, "compress": compress}
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        header = await _header(reader)
        if not header.get("ok"):
            raise RuntimeFailure(f"peer cannot send {name}: {header.get('error')}")
        size, sha256 = int(str(header["size"])), str(header["sha256"])
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            tar_path = await _receive_payload(reader, header, Path(tmp), on_progress)
            raw_size = tar_path.stat().st_size
            await unpack(tar_path, into)
    finally:
        await _close(writer)
    return Sent(
        bytes=size,
        sha256=sha256,
        seconds=loop.time() - started,
        raw_bytes=raw_size,
        encoding=str(header.get("encoding", IDENTITY)),
    )


class TransferServer:
    """Serves pushes into, and pulls out of, this host's migration directories.
    `limit_bps` caps what it sends back, whatever a puller asks for."""

    def __init__(self, state_dir: Path, *, limit_bps: int | None = None) -> None:
        self.state_dir = state_dir
        self.limit_bps = _check_limit(limit_bps)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def serve(self, address: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, address, port, reuse_address=True)

    def _lock(self, migration_id: str) -> asyncio.Lock:
        """One writer at a time into a migration's incoming dir (a delta edits in place)."""
        lock = self._locks.get(migration_id)
        if lock is None:
            lock = self._locks[migration_id] = asyncio.Lock()
        return lock

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
                asked = _check_limit(header.get("limit_bps"))
                limits = [x for x in (asked, self.limit_bps) if x is not None]
                await self._send(
                    writer,
                    migration_id,
                    name,
                    limit_bps=min(limits, default=None),
                    compress=header.get("compress") is True,
                )
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
        root = migration_dir(self.state_dir, migration_id)
        incoming = root / "incoming"
        try:
            # Never recreate a migration's directory: a push that arrives after the
            # destination was discarded (a retry still in flight) must not leave files.
            incoming.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise RuntimeFailure(
                f"migration {migration_id} is not prepared on this host (or was discarded)"
            ) from None
        what = f"{header['size']} bytes, {header.get('encoding', IDENTITY)}"
        with tempfile.TemporaryDirectory(dir=incoming) as tmp:
            tar_path = await _receive_payload(reader, header, Path(tmp))
            async with self._lock(migration_id):
                if name == "delta":
                    index = await self._apply_delta(tar_path, incoming / "presync", migration_id)
                    what += f", {index.entries} entries, {index.deleted} deleted"
                else:
                    final = incoming / name
                    partial = incoming / f".{name}.partial"
                    shutil.rmtree(partial, ignore_errors=True)
                    await unpack(tar_path, partial)
                    shutil.rmtree(final, ignore_errors=True)
                    partial.rename(final)
        writer.write(json.dumps({"ok": True}).encode() + b"\n")
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
        if index.entries:
            argv = ["tar", *TAR_FLAGS, "-xpf", str(tar_path), "-C", str(presync), index.dirname]
            await arun(argv, timeout=IO_TIMEOUT_S)
        return index

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        migration_id: str,
        name: str,
        *,
        limit_bps: int | None = None,
        compress: bool = False,
    ) -> None:
        images = migration_dir(self.state_dir, migration_id) / "images"
        files = sorted(p.name for p in images.glob("page*.img")) if images.is_dir() else []
        if name != "pages" or not files:
            raise RuntimeFailure(f"no {name} held for migration {migration_id}")
        with tempfile.TemporaryDirectory(dir=images.parent) as tmp:
            tar_path = Path(tmp) / "pages.tar"
            raw_size, sha256 = await pack([Member(images, f) for f in files], tar_path)
            wire, encoding = await _encode(tar_path, compress)
            size = wire.stat().st_size
            header: dict[str, object] = {"ok": True, "size": size, "sha256": sha256}
            header |= {"encoding": encoding, "raw_size": raw_size}
            writer.write(json.dumps(header).encode() + b"\n")
            await _send_file(writer, wire, limit_bps=limit_bps)
        log.info("sent %d page files back for %s (%d bytes)", len(files), migration_id, size)
