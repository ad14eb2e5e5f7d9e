"""What a transfer's tar holds, and how a dir is told apart from an older copy of it:
GNU tar packs and unpacks members (it carries what an overlay upper dir needs: whiteout
devices, opaque-dir xattrs, hard links, sparse files), a manifest describes a dir from
lstat alone, a delta plan says what turns the copy a presync left into the dir as it is
now, and the receiver prepares that copy (removals, stale xattrs) before the delta's tar
is unpacked over it, never following a symlink out of it. It knows nothing of the wire.

Every tar that arrives is checked before GNU tar unpacks it (services/runtime/tarcheck.py):
an upper dir and its deltas as a container's root filesystem (whiteouts, fifos and any
symlink target are the container's), a bundle or page files as Ferry's own files (no
device, no fifo, no setuid, symlinks only inside), and neither may write below a symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.errors import InvalidInput, RuntimeFailure
from services.runtime import tarcheck
from services.runtime.proc import arun
from services.runtime.tarcheck import TAR_FLAGS as TAR_FLAGS  # the client's and server's too
from services.runtime.tarcheck import Checked, Policy
from services.runtime.transfer import blocks
from services.runtime.transfer.blocks import PATCHES, Patch
from services.runtime.transfer.codec import IO_TIMEOUT_S, MAX_TRANSFER_BYTES, _sha256

UPPER = Policy(
    "upper dir",
    container_links=True,
    whiteouts=True,
    fifos=True,  # a running container makes them, and the manifest carries them
    setid=True,
    top_links=False,  # upper/ itself becomes an overlay's upperdir
    max_bytes=MAX_TRANSFER_BYTES,
)
UPPER_DELTA = replace(UPPER, what="delta")
# A volume holds the container's files like its upper dir, but never an overlay whiteout.
VOLUMES = replace(UPPER, what="volumes", whiteouts=False)
FILES = Policy(  # a bundle (CRIU's images, config.json) or page files: Ferry's own
    "bundle",
    container_links=False,
    whiteouts=False,
    fifos=False,
    setid=False,
    top_links=False,
    max_bytes=MAX_TRANSFER_BYTES,
)
PAGES = replace(FILES, what="page files")  # what a pull brings back

# A stat taken within this long of a change may not see a later change of the same size:
# the file's timestamps tick coarsely (a jiffy; a second on some filesystems). Such entries
# are marked racy in the presync manifest and always sent again in the delta.
RACY_NS = 1_000_000_000
DELTA_INDEX = ".ferry-delta.json"  # the delta's first tar member, beside <dirname>/
MAX_INDEX_BYTES = 256 << 20  # its removals and dirs, as JSON: far more than a million paths
DIRNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Member:
    """A path to send, and the name it gets inside the transfer."""

    base: Path
    name: str


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
    patches: tuple[Patch, ...] = ()  # files sent as their changed blocks (blocks.py)

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

    @field_validator("patches")
    @classmethod
    def _patched_inside(cls, patches: tuple[Patch, ...]) -> tuple[Patch, ...]:
        for patch in patches:
            if not _safe_rel(patch.path):
                raise ValueError(f"unsafe path {patch.path!r}")
        return patches


def _check_dirname(dirname: str) -> None:
    if not DIRNAME.match(dirname):
        raise InvalidInput(f"bad directory name {dirname!r}", field="dirname")


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


async def unpack(tar_path: Path, into: Path, *, policy: Policy = UPPER) -> Checked:
    """Check `tar_path` against `policy` (UPPER: an upper dir, a presync; FILES: a bundle;
    PAGES: page files) and what `into` already holds, then unpack it there; refused whole
    (tarcheck.UnsafeArchive) before anything is written."""
    checked = await asyncio.to_thread(tarcheck.check, tar_path, policy)
    into.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(tarcheck.check_on_disk, into, checked, policy.what)
    await arun(tarcheck.extract_argv(tar_path, into), timeout=IO_TIMEOUT_S)
    return checked


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


class CheckedDelta(DeltaIndex):
    """A delta's index, read from a tar that passed tarcheck: plus what that tar writes."""

    checked: Checked = Field(exclude=True)


def _prepare_delta(root: Path, index: CheckedDelta) -> None:
    """Remove what is gone or changed type, and drop the xattrs of the directories about
    to be unpacked over (tar adds xattrs to an existing directory but never removes any).
    First, the delta is refused, the copy untouched, if a directory it writes into without
    holding it is reached through a symlink in the copy that is not among the removals."""
    removed = {f"{index.dirname}/{rel}" for rel in index.remove}
    tarcheck.check_on_disk(root.parent, index.checked, UPPER_DELTA.what, removed=removed)
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


def _apply_patches(root: Path, index: DeltaIndex, tar_path: Path) -> None:
    """After the tar's entries are unpacked: each patched file gets its changed blocks."""
    if not index.patches:
        return
    with tarfile.open(tar_path, "r:") as tar:
        member = tar.getmember(PATCHES)
        data = tar.extractfile(member) if member.isfile() else None
        if data is None:
            raise InvalidInput(f"the delta's {PATCHES} is not a file")
        for patch in index.patches:
            path = _inside(root, patch.path)
            if path is None:
                raise RuntimeFailure(f"the patched {patch.path} is not in the copy")
            blocks.apply(path, patch, data, MAX_TRANSFER_BYTES)
        if data.read(1):
            raise InvalidInput(f"the delta's {PATCHES} holds more than its patches")


def _read_index(tar_path: Path) -> CheckedDelta:
    """The delta's index, once its whole tar passed tarcheck as an upper dir's, holding
    nothing but the index and members under the one dir it names."""
    checked = tarcheck.check(tar_path, UPPER_DELTA)
    try:
        with tarfile.open(tar_path, "r:") as tar:
            first = tar.next()
            if first is None or first.name != DELTA_INDEX or not first.isfile():
                raise InvalidInput(f"a delta must start with {DELTA_INDEX}")
            if first.size > MAX_INDEX_BYTES:
                raise InvalidInput(f"a {first.size}-byte delta index (at most {MAX_INDEX_BYTES})")
            data = tar.extractfile(first)
            assert data is not None
            index = DeltaIndex.model_validate_json(data.read())
    except (tarfile.TarError, ValidationError) as exc:
        raise InvalidInput(f"malformed delta: {exc}") from exc
    strays = checked.tops - {DELTA_INDEX, index.dirname, *([PATCHES] if index.patches else [])}
    if strays:
        raise tarcheck.UnsafeArchive(
            f"delta: members outside {index.dirname}/ ({', '.join(sorted(strays)[:3])})"
        )
    return CheckedDelta(**index.model_dump(), checked=checked)
