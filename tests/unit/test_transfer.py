"""Host-to-host transfers against a real TransferServer on loopback: pacing, compression,
presync + delta of an overlay upper dir, and refusal of corrupted bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path

import pytest

from services.errors import RuntimeFailure
from services.runtime.paths import migration_dir
from services.runtime.transfer import (
    GZIP,
    PROGRESS_EVERY_S,
    RACY_NS,
    ZSTD,
    Entry,
    Link,
    Member,
    TlsFiles,
    TransferGrant,
    TransferServer,
    auth,
    plan_delta,
    pull,
    push,
    push_delta,
    push_presync,
)

LOOPBACK = "127.0.0.1"
WINDOW_S = 0.25
LIMIT = 8 << 20
SIZE = 12 << 20

Seen = list[tuple[float, int]]  # (monotonic time, bytes) of each read


SOURCE, DESTINATION = "h-src", "h-dst"


@dataclass(frozen=True)
class Peer:
    """A running transfer server (the destination) and the state dir it serves."""

    state_dir: Path
    port: int
    tls: TlsFiles | None = None  # the source's files, when the server speaks TLS

    def incoming(self, migration_id: str, name: str) -> Path:
        return migration_dir(self.state_dir, migration_id) / "incoming" / name

    def prepared(self, source: str = SOURCE) -> str:
        """A new migration this host has prepared for `source` (it takes files only for
        those, and only from it)."""
        migration_id = new_id()
        auth.issue(migration_dir(self.state_dir, migration_id), migration_id, source=source)
        return migration_id

    def link(self, migration_id: str, port: int | None = None) -> Link:
        """How the migration's source reaches this server (through a relay's `port`)."""
        held = auth.load(migration_dir(self.state_dir, migration_id))
        key = held.key if held is not None else "0" * 64  # not prepared: any key will do
        grant = TransferGrant(migration_id=migration_id, key=key, side="received", peer="h-dst")
        return Link(LOOPBACK, port or self.port, DESTINATION, grant, self.tls)


class Relay:
    """A TCP hop in front of the real server that notes when each piece of bytes went by."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up: Seen = []
        self.down: Seen = []
        self.sent = bytearray()  # everything clients sent through, to replay it
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, seen: Seen) -> None:
        try:
            while data := await src.read(1 << 20):
                seen.append((time.monotonic(), len(data)))
                if seen is self.up:
                    self.sent += data
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            pass  # the other side hung up first: nothing left to relay

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, self.up), self._pipe(up_reader, writer, self.down)
        )
        writer.close()
        up_writer.close()


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    """A real transfer server on a free loopback port, serving its own state dir."""
    state_dir = tmp_path / "peer"
    server = await TransferServer(state_dir).serve(LOOPBACK, 0)
    yield Peer(state_dir, server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


@pytest.fixture
async def relay(peer: Peer) -> AsyncIterator[Relay]:
    """A relay in front of `peer`, measuring the bytes on the wire."""
    hop = await Relay(peer.port).start()
    yield hop
    await hop.stop()


def new_id() -> str:
    return secrets.token_hex(8)


def once() -> Callable[[], bool]:
    """A fault that fires on the first call only."""
    fired: list[bool] = []

    def fire() -> bool:
        first = not fired
        fired.append(True)
        return first

    return fire


def worst_rate(seen: Seen, window_s: float = WINDOW_S) -> float:
    """The highest rate over any window of at least `window_s` between two reads."""
    times = [t for t, _ in seen]
    total = list(accumulate(n for _, n in seen))
    worst = 0.0
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            if times[j] - times[i] >= window_s:
                worst = max(worst, (total[j] - total[i]) / (times[j] - times[i]))
    return worst


def span(seen: Seen) -> float:
    return seen[-1][0] - seen[0][0]


async def test_a_limited_push_keeps_to_the_limit_over_every_window(
    tmp_path: Path, peer: Peer, relay: Relay
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    blob = os.urandom(SIZE)
    (src / "blob").write_bytes(blob)
    calls: list[tuple[float, int, int]] = []

    async def note(done: int, total: int) -> None:
        calls.append((time.monotonic(), done, total))

    mid = peer.prepared()
    sent = await push(
        peer.link(mid, relay.port),
        mid,
        "bundle",
        [Member(src, "blob")],
        tmp_path / "scratch",
        limit_bps=LIMIT,
        on_progress=note,
    )
    limited = list(relay.up)
    assert (peer.incoming(mid, "bundle") / "blob").read_bytes() == blob

    rate, took = worst_rate(limited), span(limited)
    print(
        f"\nlimited: {LIMIT / 2**20:.1f} MiB/s asked, worst {WINDOW_S}s window "
        f"{rate / 2**20:.2f} MiB/s ({rate / LIMIT:.3f}x), mean {sent.bytes / took / 2**20:.2f} "
        f"MiB/s over {took:.3f}s, {len(limited)} reads"
    )
    assert rate <= 1.15 * LIMIT
    assert took >= 0.85 * sent.bytes / LIMIT  # no window is vacuous, nothing ran ahead
    assert took <= 1.5 * sent.bytes / LIMIT  # and the pacer does not hold back far below it

    assert calls[-1][1:] == (sent.bytes, sent.bytes)
    gaps = [b[0] - a[0] for a, b in pairwise(calls[:-1])]  # the last call is the 100% one
    assert all(gap >= PROGRESS_EVERY_S * 0.99 for gap in gaps)
    assert len(calls) <= took / PROGRESS_EVERY_S + 2

    relay.up.clear()
    fast = await push(
        peer.link(mid, relay.port), mid, "bundle", [Member(src, "blob")], tmp_path / "scratch"
    )
    unlimited = list(relay.up)
    print(
        f"unlimited: {fast.bytes / span(unlimited) / 2**20:.1f} MiB/s over {span(unlimited):.3f}s"
    )
    assert span(unlimited) < took / 2
    assert (peer.incoming(mid, "bundle") / "blob").read_bytes() == blob


async def test_a_limited_pull_is_paced_by_the_server(
    tmp_path: Path, peer: Peer, relay: Relay
) -> None:
    mid, limit = peer.prepared(), 4 << 20
    images = migration_dir(peer.state_dir, mid) / "images"
    images.mkdir(parents=True)
    pages = os.urandom(4 << 20)
    (images / "pages-1.img").write_bytes(pages)
    calls: list[tuple[int, int]] = []

    async def note(done: int, total: int) -> None:
        calls.append((done, total))

    got = await pull(
        peer.link(mid, relay.port),
        mid,
        "pages",
        tmp_path / "back",
        tmp_path / "scratch",
        limit_bps=limit,
        on_progress=note,
    )
    assert (tmp_path / "back" / "pages-1.img").read_bytes() == pages
    rate, took = worst_rate(relay.down), span(relay.down)
    print(f"\npull: worst window {rate / limit:.3f}x of the limit, {took:.3f}s")
    assert rate <= 1.15 * limit
    assert took >= 0.85 * got.bytes / limit
    assert calls[-1] == (got.bytes, got.bytes) and len(calls) <= took / PROGRESS_EVERY_S + 2


async def test_a_compressed_push_arrives_identical_and_smaller_on_the_wire(
    tmp_path: Path, peer: Peer, relay: Relay
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    text = b"".join(f"line {i}: the counter keeps counting\n".encode() for i in range(200_000))
    (src / "log.txt").write_bytes(text)
    mid = peer.prepared()
    sent = await push(
        peer.link(mid, relay.port),
        mid,
        "bundle",
        [Member(src, "log.txt")],
        tmp_path / "scratch",
        once(),  # the first delivery is damaged on the way: refused, then sent again
        compress=True,
    )
    assert sent.encoding == (ZSTD if shutil.which("zstd") else GZIP)
    assert (peer.incoming(mid, "bundle") / "log.txt").read_bytes() == text
    on_wire = sum(n for _, n in relay.up)
    assert on_wire < 2 * sent.bytes + 4096  # two deliveries, each compressed
    assert sent.bytes < sent.raw_bytes / 5


async def test_without_zstd_compression_falls_back_to_gzip(
    tmp_path: Path, peer: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"  # a PATH with tar and nothing else
    bin_dir.mkdir()
    (bin_dir / "tar").symlink_to(shutil.which("tar") or "/usr/bin/tar")
    monkeypatch.setenv("PATH", str(bin_dir))
    src = tmp_path / "src"
    src.mkdir()
    text = b"abc" * 1_000_000
    (src / "data").write_bytes(text)
    mid = peer.prepared()
    sent = await push(
        peer.link(mid), mid, "bundle", [Member(src, "data")], tmp_path / "s", compress=True
    )
    assert sent.encoding == GZIP and sent.bytes < sent.raw_bytes / 50
    assert (peer.incoming(mid, "bundle") / "data").read_bytes() == text
    with pytest.raises(RuntimeFailure, match="corrupted"):
        other = peer.prepared()
        await push(
            peer.link(other),
            other,
            "bundle",
            [Member(src, "data")],
            tmp_path / "s",
            lambda: True,
            compress=True,
        )


async def test_a_compressed_pull_arrives_identical(tmp_path: Path, peer: Peer) -> None:
    mid = peer.prepared()
    images = migration_dir(peer.state_dir, mid) / "images"
    images.mkdir(parents=True)
    pages = bytes(4096) * 512 + os.urandom(4096)
    (images / "pages-1.img").write_bytes(pages)
    got = await pull(peer.link(mid), mid, "pages", tmp_path / "back", tmp_path / "s", compress=True)
    assert got.encoding in (ZSTD, GZIP) and got.bytes < got.raw_bytes / 10
    assert (tmp_path / "back" / "pages-1.img").read_bytes() == pages


# --- presync and delta ----------------------------------------------------------------


def snapshot(root: Path) -> tuple[dict[str, tuple[object, ...]], set[frozenset[str]]]:
    """What a receiver must reproduce: types, modes, owners, mtimes, contents, link
    targets, device numbers and xattrs of every entry, and which names share an inode."""
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, set[str]] = defaultdict(set)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            fields: list[object] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)]
            fields += [st.st_uid, st.st_gid, st.st_mtime_ns]
            if stat.S_ISREG(st.st_mode):
                fields.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
                if st.st_nlink > 1:
                    inodes[st.st_ino].add(rel)
            elif stat.S_ISLNK(st.st_mode):
                fields.append(os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                fields.append(st.st_rdev)
            names = sorted(os.listxattr(path, follow_symlinks=False))
            fields.append(tuple((a, os.getxattr(path, a, follow_symlinks=False)) for a in names))
            entries[rel] = tuple(fields)
    return entries, {frozenset(group) for group in inodes.values()}


def upper_dir(base: Path) -> Path:
    """An overlay upper dir as a container leaves it: files, subdirs, links, a whiteout,
    an opaque dir and a tagged one."""
    upper = base / "upper"
    (upper / "sub" / "deep").mkdir(parents=True)
    (upper / "opaque").mkdir()
    (upper / "tagged").mkdir()
    for rel, text in {
        "a.txt": "alpha\n",
        "b.txt": "bravo\n",
        "gone.txt": "soon gone\n",
        "becomes_dir": "a file, for now\n",
        "sub/c.txt": "charlie\n",
        "sub/deep/d.txt": "delta\n",
        "opaque/e.txt": "echo\n",
        "hard1": "one inode, two names\n",
    }.items():
        (upper / rel).write_text(text)
    os.link(upper / "hard1", upper / "hard2")
    (upper / "link").symlink_to("b.txt")
    os.mknod(upper / "wh", stat.S_IFCHR, 0)  # overlay whiteout: a 0/0 char device
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "tagged", "user.tag", b"1")
    os.chown(upper / "sub" / "c.txt", 1234, 5678)
    return upper


def change(upper: Path) -> None:
    """What the container does between presync and freeze."""
    with (upper / "a.txt").open("a") as f:
        f.write("more alpha\n")
    (upper / "new.txt").write_text("november\n")
    (upper / "gone.txt").unlink()
    (upper / "becomes_dir").unlink()
    (upper / "becomes_dir").mkdir()
    (upper / "becomes_dir" / "inner.txt").write_text("india\n")
    (upper / "sub" / "deep" / "d.txt").write_text("DELTA\n")  # same size, in place
    (upper / "sub").chmod(0o750)
    (upper / "hard1").write_text("one inode, two names, new words\n")  # hard2 too
    os.removexattr(upper / "tagged", "user.tag")


CHANGED = {
    ".",
    "a.txt",
    "new.txt",
    "becomes_dir",
    "becomes_dir/inner.txt",
    "sub",
    "sub/deep",
    "sub/deep/d.txt",
    "tagged",
    "hard1",
    "hard2",
}


async def replay(port: int, data: bytes) -> dict[str, object]:
    """Deliver recorded bytes again, as a redelivered step would, and read the verdict."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(data)
    await writer.drain()
    verdict: dict[str, object] = json.loads(await reader.readline())
    writer.close()
    await writer.wait_closed()
    return verdict


async def test_presync_then_delta_leaves_an_equal_tree_and_sends_only_changes(
    tmp_path: Path, peer: Peer, relay: Relay
) -> None:
    base, mid, scratch = tmp_path / "src", peer.prepared(), tmp_path / "scratch"
    upper = upper_dir(base)
    await asyncio.sleep(RACY_NS / 1e9 + 0.1)  # no entry is racy: the count below is exact
    sent, since = await push_presync(peer.link(mid), mid, base, "upper", scratch)
    there = peer.incoming(mid, "presync") / "upper"
    assert sent.entries == len(since) == 16
    assert snapshot(there) == snapshot(upper)
    assert os.getxattr(there / "opaque", "trusted.overlay.opaque") == b"y"

    change(upper)
    since_json = json.loads(json.dumps(since))  # as a worker would keep it between steps
    relay.sent.clear()
    delta = await push_delta(peer.link(mid, relay.port), mid, base, "upper", since_json, scratch)
    assert snapshot(there) == snapshot(upper)
    assert (delta.entries, delta.deleted) == (len(CHANGED), 1)
    assert plan_delta(since, {}).deleted == len(since)
    assert stat.S_ISCHR(os.lstat(there / "wh").st_mode) and os.lstat(there / "wh").st_rdev == 0
    assert os.listxattr(there / "tagged") == []

    assert await replay(peer.port, bytes(relay.sent)) == {"ok": True}  # the same bytes again
    assert snapshot(there) == snapshot(upper)
    again = await push_delta(peer.link(mid), mid, base, "upper", since, scratch)
    assert (again.entries, again.deleted) == (delta.entries, 1)
    assert snapshot(there) == snapshot(upper)


@pytest.mark.parametrize("compress", [False, True])
async def test_a_corrupted_delta_is_refused_and_a_clean_one_then_lands(
    tmp_path: Path, peer: Peer, compress: bool
) -> None:
    base, mid, scratch = tmp_path / "src", peer.prepared(), tmp_path / "scratch"
    upper = upper_dir(base)
    _, since = await push_presync(peer.link(mid), mid, base, "upper", scratch)
    there = peer.incoming(mid, "presync") / "upper"
    before = snapshot(there)
    change(upper)
    with pytest.raises(RuntimeFailure, match="corrupted"):
        await push_delta(
            peer.link(mid),
            mid,
            base,
            "upper",
            since,
            scratch,
            compress=compress,
            damage=lambda: True,
        )
    assert snapshot(there) == before
    sent = await push_delta(
        peer.link(mid),
        mid,
        base,
        "upper",
        since,
        scratch,
        compress=compress,
        limit_bps=64 << 20,
        damage=once(),
    )
    assert snapshot(there) == snapshot(upper)
    assert sent.entries >= len(CHANGED)  # fresh entries are racy, so they travel again


async def test_a_delta_without_its_presync_is_refused(tmp_path: Path, peer: Peer) -> None:
    base = tmp_path / "src"
    upper = upper_dir(base)
    with pytest.raises(RuntimeFailure, match="no presync"):
        alone = peer.prepared()
        await push_delta(peer.link(alone), alone, base, "upper", {}, tmp_path / "s")
    assert upper.is_dir()


def test_a_racy_entry_travels_again_though_its_stat_did_not_change() -> None:
    root = Entry("d", 0, 5, 5, 0o755, 0, 0, 2, "", racy=False)
    file = Entry("f", 1, 10, 10, 0o644, 0, 0, 1, "", racy=False)
    since = {".": root, "racy": file._replace(racy=True), "settled": file}
    now = {".": root, "racy": file, "settled": file}
    plan = plan_delta(json.loads(json.dumps(since)), now)
    assert (plan.send, plan.remove, plan.deleted) == ((".", "racy"), (), 0)


async def test_a_push_for_a_migration_this_host_has_not_prepared_is_refused(
    tmp_path: Path, peer: Peer
) -> None:
    """A retry still in flight after the destination was discarded must leave nothing."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(b"late")
    late = new_id()
    with pytest.raises(RuntimeFailure, match="not prepared on this host"):
        await push(peer.link(late), late, "bundle", [Member(src, "data")], tmp_path / "s")
    assert not migration_dir(peer.state_dir, late).exists()
