"""Unpacking what came from elsewhere: malicious layers, bundles, upper dirs and deltas are
refused whole and write nothing outside their directory (real tars, real GNU tar), caps on
sizes and members, decompression bombs; and what a container's files really hold (overlay
whiteouts, opaque xattrs, absolute symlinks, hard links, sparse files) still unpacks."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from services.errors import InvalidInput, RuntimeFailure
from services.runtime import tarcheck
from services.runtime.layers import LAYER, file_digest, pack_rootfs, unpack_layer
from services.runtime.tarcheck import UnsafeArchive
from services.runtime.transfer.codec import (
    GZIP,
    MAX_TRANSFER_BYTES,
    ZSTD,
    _decode,
    _gzip,
    check_sizes,
)
from services.runtime.transfer.manifest import (
    DELTA_INDEX,
    FILES,
    UPPER,
    DeltaIndex,
    Member,
    _prepare_delta,
    _read_index,
    pack,
    unpack,
)

Entry = tuple[tarfile.TarInfo, bytes]


# --- building tars by hand ------------------------------------------------------------


def file(name: str, data: bytes = b"x", mode: int = 0o644, **pax: str) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.pax_headers = len(data), mode, dict(pax)
    return info, data


def node(name: str, kind: bytes, target: str = "", major: int = 0, minor: int = 0) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.devmajor, info.devminor = kind, target, major, minor
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, b""


def folder(name: str) -> Entry:
    return node(name, tarfile.DIRTYPE)


def symlink(name: str, target: str) -> Entry:
    return node(name, tarfile.SYMTYPE, target)


def hardlink(name: str, target: str) -> Entry:
    return node(name, tarfile.LNKTYPE, target)


def device(name: str, major: int, minor: int, kind: bytes = tarfile.CHRTYPE) -> Entry:
    return node(name, kind, major=major, minor=minor)


def fifo(name: str) -> Entry:
    return node(name, tarfile.FIFOTYPE)


def write_tar(path: Path, entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[object, ...]]:
    """Everything under `root` but `skip`: types, modes, link counts, contents, targets."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            if path in skip:
                continue
            st = os.lstat(path)
            fields: list[object] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink]
            if stat.S_ISREG(st.st_mode):
                fields.append(path.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                fields.append(os.readlink(path))
            found[str(path.relative_to(root))] = tuple(fields)
    return found


class Sentinel:
    """A directory beside the target with a secret in it, and a record of the whole tmp
    dir outside the target: anything a refused archive wrote or linked shows."""

    def __init__(self, tmp_path: Path, target: Path) -> None:
        self.tmp_path, self.target = tmp_path, target
        self.dir = tmp_path / "outside"
        self.dir.mkdir()
        (self.dir / "secret").write_text("secret\n")
        self.before = tree(tmp_path, skip=(target,))

    def untouched(self) -> bool:
        return tree(self.tmp_path, skip=(self.target,)) == self.before


# Each builds a tar that tries to reach `outside` (beside the target, two levels above
# the directory a layer is unpacked into: layers/.<digest>.unpacking/).
Case = Callable[[Path], list[Entry]]
ESCAPES: dict[str, tuple[Case, str]] = {
    "symlink-absolute": (
        lambda out: [symlink("escape", str(out)), file("escape/x")],
        "below the symlink 'escape'",
    ),
    "symlink-relative": (
        lambda out: [symlink("escape", "../../outside"), file("escape/x")],
        "below the symlink 'escape'",
    ),
    "symlink-dot-slashes": (
        lambda out: [symlink("./escape", str(out)), file("escape//x")],
        "below the symlink 'escape'",
    ),
    "dir-then-symlink": (
        lambda out: [folder("d"), symlink("d", str(out)), file("d/x")],
        "appears twice",
    ),
    "hardlink-to-symlink": (
        lambda out: [symlink("s", str(out)), hardlink("h", "s"), file("h/x")],
        "below the symlink 'h'",
    ),
    "hardlink-absolute": (
        lambda out: [hardlink("h", str(out / "secret"))],
        "is absolute",
    ),
    "hardlink-relative": (
        lambda out: [hardlink("h", "../../outside/secret")],
        "climbs out",
    ),
    "hardlink-not-a-member": (
        lambda out: [hardlink("h", "etc/shadow")],
        "not an earlier member",
    ),
    "dotdot-name": (lambda out: [file("../../outside/x")], "unsafe path"),
    "absolute-name": (lambda out: [file(str(out / "x"))], "unsafe path"),
    "char-device": (lambda out: [device("null", 1, 3)], "char device 1:3"),
    "block-device": (lambda out: [device("sda", 8, 0, tarfile.BLKTYPE)], "block device 8:0"),
    "file-with-slash": (lambda out: [file("x/")], "ending in /"),
}


# --- layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ESCAPES, ids=list(ESCAPES))
def test_a_malicious_layer_is_refused_and_writes_nothing_outside(tmp_path: Path, case: str) -> None:
    build, why = ESCAPES[case]
    layers_dir = tmp_path / "layers"
    guard = Sentinel(tmp_path, layers_dir)
    evil = write_tar(tmp_path / "evil.tar", build(guard.dir))
    guard.before = tree(tmp_path, skip=(layers_dir,))
    digest = file_digest(evil)
    with pytest.raises(UnsafeArchive, match=why) as caught:
        unpack_layer(evil, digest, layers_dir)
    assert not caught.value.retryable and caught.value.detail().kind == "invalid"
    assert guard.untouched()
    assert not (layers_dir / digest).exists()
    assert not [p for p in layers_dir.iterdir() if p.name.endswith(".unpacking")]


def test_a_fifo_is_refused_in_a_layer_and_when_packing_one(tmp_path: Path) -> None:
    evil = write_tar(tmp_path / "evil.tar", [fifo("pipe")])
    with pytest.raises(UnsafeArchive, match="a fifo"):
        unpack_layer(evil, file_digest(evil), tmp_path / "layers")
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    os.mkfifo(rootfs / "initctl")
    with pytest.raises(UnsafeArchive, match="'initctl': a fifo"):
        pack_rootfs(rootfs, tmp_path / "layer.tar")


def test_a_layer_above_its_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = write_tar(tmp_path / "big.tar", [file("blob", os.urandom(20_000))])
    small = replace(LAYER, max_bytes=10_000)
    with pytest.raises(UnsafeArchive, match=r"above the cap of 10000"):
        unpack_layer(big, "0" * 64, tmp_path / "layers", policy=small)  # no digest taken
    many = write_tar(tmp_path / "many.tar", [file(f"f{i}") for i in range(4)])
    with pytest.raises(UnsafeArchive, match=r"'f3': more than 3 members"):
        unpack_layer(
            many, file_digest(many), tmp_path / "layers", policy=replace(LAYER, max_members=3)
        )


def test_a_rootfs_keeps_absolute_and_climbing_symlinks_whiteouts_and_setuid(
    tmp_path: Path,
) -> None:
    rootfs = tmp_path / "rootfs"
    for d in ("usr/lib", "usr/bin", "etc/alternatives", "opaque"):
        (rootfs / d).mkdir(parents=True)
    (rootfs / "usr/bin/python3").write_text("#!fake\n")
    (rootfs / "usr/bin/su").write_text("setuid\n")
    (rootfs / "usr/bin/su").chmod(0o4755)
    os.link(rootfs / "usr/bin/python3", rootfs / "usr/bin/python")
    (rootfs / "lib").symlink_to("usr/lib")
    (rootfs / "etc/alternatives/python").symlink_to("/usr/bin/python3")
    (rootfs / "usr/bin/climbs").symlink_to("../../../../usr/bin/python3")
    os.mknod(rootfs / "gone", stat.S_IFCHR, 0)  # an overlay whiteout
    layers_dir = tmp_path / "layers"
    guard = Sentinel(tmp_path, layers_dir)
    digest = pack_rootfs(rootfs, tmp_path / "layer.tar")
    guard.before = tree(tmp_path, skip=(layers_dir,))
    out = unpack_layer(tmp_path / "layer.tar", digest, layers_dir)
    assert os.readlink(out / "lib") == "usr/lib"
    assert os.readlink(out / "etc/alternatives/python") == "/usr/bin/python3"
    assert os.readlink(out / "usr/bin/climbs") == "../../../../usr/bin/python3"
    assert os.lstat(out / "gone").st_rdev == 0 and stat.S_ISCHR(os.lstat(out / "gone").st_mode)
    assert (out / "usr/bin/su").stat().st_mode & 0o7777 == 0o4755
    assert os.stat(out / "usr/bin/python").st_ino == os.stat(out / "usr/bin/python3").st_ino
    assert guard.untouched()


# --- transfers ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [UPPER, FILES], ids=["upper", "bundle"])
@pytest.mark.parametrize("case", ESCAPES, ids=list(ESCAPES))
async def test_a_malicious_transfer_is_refused_and_writes_nothing_outside(
    tmp_path: Path, case: str, policy: tarcheck.Policy
) -> None:
    build, why = ESCAPES[case]
    into = tmp_path / "incoming" / ".bundle.partial"
    guard = Sentinel(tmp_path, tmp_path / "incoming")
    if policy is FILES and case in (
        "symlink-absolute",
        "symlink-dot-slashes",
        "hardlink-to-symlink",
    ):
        why = "symlink to the absolute path"  # a bundle refuses the symlink itself
    elif policy is FILES and case == "symlink-relative":
        why = "points outside the directory"
    elif case in ("symlink-absolute", "symlink-relative", "symlink-dot-slashes"):
        why = "a symlink at the top"  # upper/ itself is the host's: see the next test
    elif case == "hardlink-to-symlink":
        why = "'s': a symlink at the top"
    evil = write_tar(tmp_path / "evil.tar", build(guard.dir))
    guard.before = tree(tmp_path, skip=(tmp_path / "incoming",))
    with pytest.raises(UnsafeArchive, match=why):
        await unpack(evil, into, policy=policy)
    assert guard.untouched()
    assert not into.exists()


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([symlink("config.json", "/etc/shadow")], "symlink to the absolute path '/etc/shadow'"),
        ([folder("a"), symlink("a/l", "b/../..")], "`..` after a name may climb out"),
        ([folder("images"), symlink("images/x", "../../outside")], "points outside"),
        ([file("images", b"elf", mode=0o4755)], "setuid/setgid mode 4755"),
        ([file("tool", b"elf", **{"SCHILY.xattr.security.capability": "\x01"})], "capability"),
        ([device("wh", 0, 0)], "char device 0:0 .bundles hold none"),
        ([fifo("pipe")], "a fifo .bundles hold none"),
    ],
    ids=[
        "absolute",
        "dotdot-after-a-name",
        "climbs-above",
        "setuid",
        "capability",
        "device",
        "fifo",
    ],
)
async def test_a_bundle_holds_only_ferrys_own_files(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    evil = write_tar(tmp_path / "evil.tar", entries)
    with pytest.raises(UnsafeArchive, match=why):
        await unpack(evil, tmp_path / "into", policy=FILES)
    assert not (tmp_path / "into").exists()


async def test_a_bundle_may_link_inside_itself(tmp_path: Path) -> None:
    good = write_tar(
        tmp_path / "good.tar",
        [
            folder("images"),
            file("images/pages-1.img", b"pages"),
            file("config.json", b"{}"),
            symlink("images/last", "pages-1.img"),
            symlink("images/config", "../config.json"),
            symlink("images/here", "./."),
            symlink("images/parent", "../it-2"),  # CRIU's link to a pre-copy round's images
        ],
    )
    await unpack(good, tmp_path / "into", policy=FILES)
    assert (tmp_path / "into" / "images" / "config").read_bytes() == b"{}"


async def test_nothing_is_unpacked_through_a_symlink_already_on_disk(tmp_path: Path) -> None:
    into = tmp_path / "images"
    guard = Sentinel(tmp_path, into)
    into.mkdir()
    (into / "d").symlink_to(guard.dir)
    evil = write_tar(tmp_path / "evil.tar", [file("d/x", b"pwned")])
    guard.before = tree(tmp_path, skip=(into,))
    with pytest.raises(UnsafeArchive, match="through the symlink 'd' already in"):
        await unpack(evil, into, policy=FILES)
    assert guard.untouched()


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([symlink("upper", "/etc")], "'upper': a symlink at the top"),
        ([symlink("s", "/etc"), hardlink("upper", "s")], "'s': a symlink at the top"),
        (
            [folder("upper"), symlink("upper/escape", "/etc"), file("upper/escape/x")],
            "'upper/escape/x': is below the symlink 'upper/escape'",
        ),
    ],
    ids=["upper-is-a-symlink", "hardlinked-top", "below-a-nested-symlink"],
)
async def test_an_upper_dir_is_never_itself_a_symlink_nor_written_through_one(
    tmp_path: Path, entries: list[Entry], why: str
) -> None:
    evil = write_tar(tmp_path / "evil.tar", entries)
    with pytest.raises(UnsafeArchive, match=why):
        await unpack(evil, tmp_path / ".presync.partial")
    ok = write_tar(tmp_path / "ok.tar", [folder("upper"), symlink("upper/python", "/usr/bin/x")])
    await unpack(ok, tmp_path / "presync")
    assert os.readlink(tmp_path / "presync" / "upper" / "python") == "/usr/bin/x"


def old_gnu_with_prefix(path: Path, target: Path, top: str) -> Path:
    """Python's reader joins an old-GNU header's prefix field to its name; GNU tar reads
    that field as times and takes the name alone: 'safe/escape/x' to one, 'escape/x' to
    the other."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        if top:
            tar.addfile(folder(top)[0])
        info, _ = symlink(f"{top}escape", str(target))
        tar.addfile(info)
        info, data = file(f"{top}escape/x", b"pwned")
        block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
        block[345:349] = b"safe"
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        assert tar.fileobj is not None
        tar.fileobj.write(bytes(block) + data.ljust(512, b"\0"))
        tar.offset += 1024
    return path


@pytest.mark.parametrize(
    ("policy", "top"), [(UPPER, "upper/"), (LAYER, "")], ids=["upper", "layer"]
)
async def test_an_archive_the_two_readers_read_differently_is_refused(
    tmp_path: Path, policy: tarcheck.Policy, top: str
) -> None:
    into = tmp_path / "into"
    guard = Sentinel(tmp_path, into)
    evil = old_gnu_with_prefix(tmp_path / "evil.tar", guard.dir, top)
    guard.before = tree(tmp_path, skip=(into,))
    with tarfile.open(evil) as tar:
        assert tar.getnames()[-2:] == [f"{top}escape", f"safe/{top}escape/x"]
    with pytest.raises(UnsafeArchive, match=rf"GNU tar reads it as .*b'{top}escape/x'.*ambiguous"):
        await unpack(evil, into, policy=policy)
    assert guard.untouched()


async def test_members_after_the_end_of_the_archive_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "lone.tar"
    with tarfile.open(path, "w") as tar:  # a lone zero block: both readers stop there
        tar.addfile(file("a")[0], io.BytesIO(b"x"))
        assert tar.fileobj is not None
        tar.fileobj.write(bytes(512))
        tar.offset += 512
        tar.addfile(file("hidden")[0], io.BytesIO(b"x"))
    with pytest.raises(UnsafeArchive, match="data after the end of the archive"):
        await unpack(path, tmp_path / "into")


async def test_an_oversized_extended_header_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tarcheck, "HEADER_MAX", 4096)
    path = write_tar(tmp_path / "big.tar", [file("a", comment="x" * 8000)])
    with pytest.raises(UnsafeArchive, match=r"-byte extended header \(at most 4096\)"):
        await unpack(path, tmp_path / "into")


async def test_a_transfer_above_its_caps_is_refused(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "t.tar", [file(f"f{i}") for i in range(5)])
    with pytest.raises(UnsafeArchive, match="above the cap of 4096 bytes"):
        await unpack(path, tmp_path / "into", policy=replace(UPPER, max_bytes=4096))
    with pytest.raises(UnsafeArchive, match="more than 4 members"):
        await unpack(path, tmp_path / "into", policy=replace(UPPER, max_members=4))


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Types, modes, owners, contents, targets, devices, xattrs and shared inodes."""
    found: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            fields: list[object] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode)]
            fields += [st.st_uid, st.st_gid, st.st_rdev]
            if stat.S_ISREG(st.st_mode):
                fields += [Path(path).read_bytes(), inodes.setdefault(st.st_ino, name)]
            elif stat.S_ISLNK(st.st_mode):
                fields.append(os.readlink(path))
            names = sorted(os.listxattr(path, follow_symlinks=False))
            fields.append(tuple((a, os.getxattr(path, a, follow_symlinks=False)) for a in names))
            found[os.path.relpath(path, root)] = tuple(fields)
    return found


def container_upper(base: Path) -> Path:
    """An upper dir as a running container leaves it, awkward names and all."""
    upper = base / "upper"
    (upper / "opaque").mkdir(parents=True)
    (upper / "opaque" / "kept.txt").write_text("kept\n")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "whiteout", stat.S_IFCHR, 0)
    os.mkfifo(upper / "pipe")
    (upper / "one").write_text("one inode\n")
    os.link(upper / "one", upper / "two")
    (upper / "python").symlink_to("/usr/bin/python3")
    (upper / "climbs").symlink_to("../../../../etc/hostname")
    with (upper / "sparse").open("wb") as f:
        f.truncate(64 << 20)
        f.write(b"head")
    (upper / os.fsdecode(b'we"ird\\name\n\xff? \xc3\xa9')).write_text("odd\n")
    (upper / ("long" * 40)).write_text("a GNU long name or a pax path\n")
    os.chown(upper / "one", 1234, 5678)
    return upper


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
async def test_an_upper_dir_with_whiteouts_xattrs_and_links_still_unpacks(
    tmp_path: Path, fmt: str
) -> None:
    upper = container_upper(tmp_path / "src")
    guard = Sentinel(tmp_path, tmp_path / "dst")
    tar_path = tmp_path / "upper.tar"
    if fmt == "posix":  # what Ferry's own pack writes (--xattrs makes it pax)
        await pack([Member(upper.parent, "upper")], tar_path)
    else:  # old GNU headers: long names as 'L' members, sparse files as 'S'
        argv = ["tar", "--format=gnu", *tarcheck.TAR_FLAGS, "-cf", str(tar_path)]
        subprocess.run([*argv, "-C", str(upper.parent), "upper"], check=True)
    guard.before = tree(tmp_path, skip=(tmp_path / "dst",))
    checked = await unpack(tar_path, tmp_path / "dst")
    assert checked.members == len(snapshot(upper))
    there = tmp_path / "dst" / "upper"
    want, got = snapshot(upper), snapshot(there)
    if fmt == "gnu":  # the GNU format has no room for xattrs
        want = {k: v[:-1] for k, v in want.items()}
        got = {k: v[:-1] for k, v in got.items()}
    assert got == want
    assert os.stat(there / "sparse").st_blocks * 512 < 1 << 20  # holes stay holes
    assert guard.untouched()


# --- deltas ---------------------------------------------------------------------------


def delta_tar(path: Path, index: DeltaIndex, entries: list[Entry]) -> Path:
    body = index.model_dump_json().encode()
    return write_tar(path, [file(DELTA_INDEX, body), *entries])


async def test_a_delta_never_writes_through_a_symlink_the_presync_left(tmp_path: Path) -> None:
    presync = tmp_path / "presync"
    guard = Sentinel(tmp_path, presync)
    (presync / "upper").mkdir(parents=True)
    (presync / "upper" / "link").symlink_to(guard.dir)  # a container's own absolute link
    (presync / "upper" / "gone").write_text("left by the presync\n")
    index = DeltaIndex(dirname="upper", remove=("gone",), entries=1, deleted=1)
    evil = delta_tar(tmp_path / "evil.tar", index, [file("upper/link/x", b"pwned")])
    checked = _read_index(evil)  # the tar alone is fine: it holds no symlink
    guard.before, kept = tree(tmp_path, skip=(presync,)), tree(presync)
    with pytest.raises(UnsafeArchive, match="through the symlink 'upper/link' already in"):
        _prepare_delta(presync / "upper", checked)
    assert tree(presync) == kept  # refused before anything was removed
    assert guard.untouched()


async def test_a_delta_that_turns_a_symlink_into_a_dir_still_applies(tmp_path: Path) -> None:
    presync = tmp_path / "presync"
    guard = Sentinel(tmp_path, presync)
    (presync / "upper").mkdir(parents=True)
    (presync / "upper" / "link").symlink_to(guard.dir)
    index = DeltaIndex(dirname="upper", remove=("link",), entries=2, deleted=0)
    good = delta_tar(
        tmp_path / "good.tar", index, [folder("upper/link"), file("upper/link/x", b"ok")]
    )
    guard.before = tree(tmp_path, skip=(presync,))
    checked = _read_index(good)
    _prepare_delta(presync / "upper", checked)
    subprocess.run(tarcheck.extract_argv(good, presync, "upper"), check=True)
    assert (presync / "upper" / "link" / "x").read_bytes() == b"ok"
    assert not (presync / "upper" / "link").is_symlink() and guard.untouched()


def test_a_delta_holds_nothing_but_its_index_and_its_dir(tmp_path: Path) -> None:
    index = DeltaIndex(dirname="upper", entries=1, deleted=0)
    stray = delta_tar(tmp_path / "d.tar", index, [file("upper/a"), file("etc/cron.d/x")])
    with pytest.raises(UnsafeArchive, match=r"outside upper/ \(etc\)"):
        _read_index(stray)
    evil = delta_tar(tmp_path / "e.tar", index, [symlink("upper/l", "/"), file("upper/l/x")])
    with pytest.raises(UnsafeArchive, match="delta: member 'upper/l/x': is below the symlink"):
        _read_index(evil)


# --- sizes and decompression ----------------------------------------------------------


def test_header_sizes_are_whole_numbers_under_the_cap() -> None:
    assert check_sizes(10, 20) == (10, 20)
    assert check_sizes(10, None) == (10, 10)  # identity: what travels is the tar
    assert check_sizes(MAX_TRANSFER_BYTES, MAX_TRANSFER_BYTES)
    for size, raw, field in [
        (MAX_TRANSFER_BYTES + 1, 1, "size"),
        (1, MAX_TRANSFER_BYTES + 1, "raw_size"),
        (-1, 1, "size"),
        ("12", 1, "size"),
        (True, 1, "size"),
        (1, 2.5, "raw_size"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            check_sizes(size, raw)
        assert caught.value.field == field
    with pytest.raises(InvalidInput, match="raw_size 2048 bytes is above the cap of 1024"):
        check_sizes(10, 2048, cap=1024)


def bomb(tmp_path: Path, encoding: str, size: int) -> Path:
    """`size` zero bytes, encoded: a few KiB on the wire."""
    raw = tmp_path / "zeros"
    with raw.open("wb") as f:
        f.truncate(size)
    if encoding == GZIP:
        _gzip(raw, tmp_path / "bomb")
    else:
        subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(tmp_path / "bomb")], check=True)
    raw.unlink()
    return tmp_path / "bomb"


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
async def test_a_decompression_bomb_stops_at_the_announced_size(
    tmp_path: Path, encoding: str
) -> None:
    wire = bomb(tmp_path, encoding, 64 << 20)
    assert wire.stat().st_size < 1 << 20
    out = tmp_path / "payload.tar"
    with pytest.raises(RuntimeFailure, match="more than the announced 1048576 bytes"):
        await _decode(encoding, wire, out, 1 << 20)
    assert out.stat().st_size <= 1 << 20
    if encoding == ZSTD:  # and its zstd is gone with it
        running = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
        assert not [c for c in running if str(wire).encode() in c]


@pytest.mark.parametrize("encoding", [GZIP, ZSTD])
async def test_a_payload_announced_above_the_cap_is_not_decoded(
    tmp_path: Path, encoding: str
) -> None:
    wire = bomb(tmp_path, encoding, 4 << 20)
    out = tmp_path / "payload.tar"
    with pytest.raises(InvalidInput, match="raw_size 4194304 bytes is above the cap") as caught:
        await _decode(encoding, wire, out, 4 << 20, cap=1 << 20)
    assert caught.value.field == "raw_size" and not out.exists()
    await _decode(encoding, wire, out, 4 << 20)  # under the default cap: decodes
    assert out.stat().st_size == 4 << 20


async def test_a_zstd_stream_that_ends_early_is_corrupted(tmp_path: Path) -> None:
    wire = bomb(tmp_path, ZSTD, 4 << 20)
    with wire.open("r+b") as f:
        f.truncate(wire.stat().st_size // 2)
    with pytest.raises(RuntimeFailure, match="transfer corrupted: cannot decode zstd") as caught:
        await _decode(ZSTD, wire, tmp_path / "out", 4 << 20)
    assert caught.value.retryable
