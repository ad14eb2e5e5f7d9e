"""Ferry's own guard before GNU tar unpacks an archive that came from elsewhere (a layer
from the layer store, a bundle, page files, an upper dir and its deltas from a peer): it
reads the member list, headers only, and refuses the whole archive, naming the member and
why, if any member could write outside the directory it is unpacked into. The Python here
(Debian's 3.11.2) has no `tarfile` extraction filters, and GNU tar itself follows a
directory symlink already on disk and, without this, would take names from headers that
Python's reader reads otherwise; nothing is written before every member passed.

GNU tar, not Python's `tarfile`, does the unpacking: it carries what an overlay upper dir
needs (whiteouts, `trusted.overlay.*` xattrs, hard links, sparse files, numeric owners),
replaces an existing symlink instead of writing through it, and creates a hard link to a
symlink as a symlink (link(2) never follows it). It is run without `--overwrite`,
`--keep-directory-symlink`, `--absolute-names` or `--dereference`: each of those would
write through a symlink.

The rules, for every archive:
- Names are relative and hold no `..`. `./` prefixes, repeated and trailing slashes read
  away ("./a//b/" is "a/b"); a trailing slash only on a directory; a name at most once (so
  a directory is never replaced by a symlink later in the same archive, nor a symlink by
  anything); at most PATH_MAX bytes, names and link targets alike.
- No member below a symlink or a non-directory: not one the archive holds (a hard link to
  a symlink is one too), not one already on disk where the archive is unpacked
  (`check_on_disk`, for the directories the archive writes into without holding them).
- A hard link names an earlier member that is not a directory, relatively, without `..`.
- Where the top-level names are paths the host itself uses (an upper dir's archive holds
  `upper/`, which becomes an overlay's upperdir; a bundle's `images/`), none is a symlink.
- Regular files, directories, symlinks and hard links; fifos and char devices 0:0 (overlay
  whiteouts) only where the policy allows; no other device, no other member type.
- At most `max_members` members, in an archive of at most `max_bytes` bytes. That bounds
  what unpacking writes too: every byte of file data is in the archive (a truncated one is
  refused), and GNU tar makes a sparse file's holes as holes.
- The archive ends where Python's reader ends it (only zeros after), and GNU tar's own
  listing of it (`tar -tv`) agrees member by member on name, type, link target and device
  numbers: what is checked is what GNU tar unpacks (the two read some headers differently,
  an old-GNU header's prefix field for one).

Symlink targets, by what the archive is:
- A container's root filesystem (layers, upper dirs: `container_links`): any target is
  kept. `/etc/alternatives/x -> /usr/bin/x` or `lib -> usr/lib` are normal, and even
  `../../x` from `usr/bin` stays inside: the container resolves them against its own root.
  The host would follow one only if something were unpacked through it (refused above),
  if a hard link named a path through it (refused: a hard link names an earlier member,
  none of which is below a symlink), or if host code opened a path of the tree: Ferry walks
  these trees with lstat and never opens a path of them, and runc and CRIU resolve paths
  within the container's root.
- Ferry's own files (a bundle of images and `config.json`, page files): the host opens
  them by path, so a symlink must stay inside: relative, `..` only as leading parts (a `..`
  after a name could climb out of wherever that name points), no more of them than the
  link's own directory is deep. A setuid or setgid file, or a file capability, is refused
  too: such a file on the host's disk would be a way to root for anyone who can reach it.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self, cast

from services.errors import RuntimeFailure
from services.runtime.proc import host_env, run

# For packing and unpacking alike.
TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--sparse"]

MAX_MEMBERS = 1_000_000
PATH_MAX = 4096
HEADER_MAX = 1 << 20  # a pax or GNU long-name header: names and xattrs, not data
CHUNK = 1 << 20

_FILES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.GNUTYPE_SPARSE)
_META = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_GNU_TYPE = {  # the first letter of the mode in GNU tar's listing, by member type
    **dict.fromkeys(_FILES, "-"),
    tarfile.LNKTYPE: "h",
    tarfile.SYMTYPE: "l",
    tarfile.CHRTYPE: "c",
    tarfile.BLKTYPE: "b",
    tarfile.DIRTYPE: "d",
    tarfile.FIFOTYPE: "p",
}
_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_ESCAPE = re.compile(rb"\\([0-7]{3}|.)", re.DOTALL)
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}


class UnsafeArchive(RuntimeFailure):
    """An archive holds what could reach outside its directory, or more than its caps:
    unpacking it again cannot help (the same bytes are refused the same way)."""

    kind = "invalid"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retryable=False)


@dataclass(frozen=True)
class Policy:
    """What an archive of one kind may hold, and how much of it."""

    what: str  # in messages: "layer", "upper dir", "bundle"
    container_links: bool  # symlink targets are a container's, resolved in its own root
    whiteouts: bool  # char devices 0:0
    fifos: bool
    setid: bool  # setuid and setgid files, file capabilities
    top_links: bool  # a top-level name may be a symlink (not where those are Ferry's paths)
    max_bytes: int
    max_members: int = MAX_MEMBERS


@dataclass(frozen=True)
class Checked:
    """What an archive that passed writes."""

    members: int
    tops: frozenset[str]  # the first part of every name ("." for the root itself)
    assumed: frozenset[str]  # directories it writes into without holding them


class BoundedHeaderInfo(tarfile.TarInfo):
    """Refuses an oversized pax or long-name header before `tarfile` reads it whole."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type in (*_META, *_LONG) and info.size > HEADER_MAX:
            raise tarfile.ReadError(f"a {info.size}-byte extended header (at most {HEADER_MAX})")
        return info


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


def _gib(n: int) -> str:
    return f"{n} bytes ({n / (1 << 30):.1f} GiB)"


class _Listing:
    """GNU tar's listing of the archive, one member at a time."""

    def __init__(self, proc: subprocess.Popen[bytes], err: IO[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.err = proc, err
        self.lines: Iterator[bytes] = iter(proc.stdout)

    def next(self) -> tuple[str, bytes, bytes | None, str] | None:
        """(type letter, name, link target, size or "major,minor"); None at the end."""
        line = next(self.lines, None)
        if line is None:
            return None
        head, _, rest = line.rstrip(b"\n").partition(b'"')
        fields = head.split()
        if len(fields) < 3 or not rest:
            raise ValueError(f"unexpected listing line {line[:200]!r}")
        name, rest = _unquote(b'"' + rest)
        link: bytes | None = None
        for sep in (b" -> ", b" link to "):
            if rest.startswith(sep):
                link, rest = _unquote(rest[len(sep) :])
        if rest:
            raise ValueError(f"unexpected listing line {line[:200]!r}")
        return fields[0][:1].decode(), name, link, fields[2].decode()

    def finish(self) -> str:
        """Why GNU tar failed to read the archive to its end, or ""."""
        extra = next(self.lines, None)
        code = self.proc.wait()
        if extra is not None:
            return f"GNU tar lists more members than Python reads ({extra[:200]!r})"
        if code != 0:
            self.err.seek(0)
            said = self.err.read(CHUNK).decode(errors="replace").strip().splitlines()
            return f"GNU tar cannot list it: {(said or ['no output'])[-1]}"
        return ""


@contextlib.contextmanager
def _listing(tar_path: Path) -> Iterator[_Listing]:
    argv = ["tar", "--numeric-owner", "--quoting-style=c", "-tvf", str(tar_path)]
    with tempfile.TemporaryFile() as err:  # not a pipe: warnings never block the listing
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=host_env({"LC_ALL": "C"}),
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise RuntimeFailure("tar is not installed (run `make setup`)") from exc
        with proc:
            try:
                yield _Listing(proc, err)
            finally:
                if proc.poll() is None:
                    proc.kill()  # our own child: the archive was refused before its end


def _unescape(m: re.Match[bytes]) -> bytes:
    code = m.group(1)
    if len(code) == 3:
        return bytes([int(code, 8)])
    if code.decode() not in _ESCAPES:
        raise ValueError(f"unknown escape {m.group(0)!r}")
    return bytes([_ESCAPES[code.decode()]])


def _unquote(text: bytes) -> tuple[bytes, bytes]:
    """A name as GNU tar's c quoting style prints it, and what follows it."""
    m = _QUOTED.match(text)
    if m is None:
        raise ValueError(f"not a quoted name: {text[:200]!r}")
    body = m.group(1)
    if b"\\" in body:
        body = _ESCAPE.sub(_unescape, body)
    return body, text[m.end() :]


class _Walk:
    """The rules, member by member, over what the archive has written so far."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.kinds: dict[str, str] = {}  # normalised name -> d(ir), l(ink), f(ile, other)
        self.assumed: set[str] = set()
        self.tops: set[str] = set()
        self.members = 0

    def refuse(self, member: tarfile.TarInfo, why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.policy.what}: member {member.name!r}: {why}")

    def _path(self, member: tarfile.TarInfo, raw: str, what: str) -> str:
        """`raw` normalised; refused if absolute, climbing or too long."""
        if len(raw.encode(errors="surrogateescape")) > PATH_MAX:
            raise self.refuse(member, f"{what} longer than {PATH_MAX} bytes")
        if raw.startswith("/"):
            raise self.refuse(member, f"unsafe path: {what} {raw!r} is absolute")
        if ".." in raw.split("/"):
            raise self.refuse(member, f"unsafe path: {what} {raw!r} climbs out with `..`")
        return "/".join(_parts(raw)) or "."

    def member(self, m: tarfile.TarInfo) -> None:
        p = self.policy
        self.members += 1
        if self.members > p.max_members:
            raise self.refuse(m, f"more than {p.max_members} members (the cap)")
        if m.type not in _GNU_TYPE:
            raise self.refuse(m, f"unsupported member type {m.type!r}")
        name = self._path(m, m.name, "name")
        if m.name.endswith("/") and not m.isdir():
            raise self.refuse(m, "a name ending in / that is not a directory")
        if name in self.kinds:
            raise self.refuse(m, "appears twice (a later copy would replace the first)")
        if name == "." and not m.isdir():
            raise self.refuse(m, "the root itself, as something other than a directory")
        parts = name.split("/")
        self.tops.add(parts[0])
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            kind = self.kinds.get(above)
            if kind == "l":
                raise self.refuse(m, f"is below the symlink {above!r} (tar would write through it)")
            if kind == "f":
                raise self.refuse(m, f"is below {above!r}, which is not a directory")
            if kind is None:
                self.assumed.add(above)
        kind = self.kinds[name] = self._kind(m, name)
        if kind == "l" and len(parts) == 1 and not p.top_links:
            raise self.refuse(m, f"a symlink at the top, where a {p.what}'s paths are Ferry's")

    def _kind(self, m: tarfile.TarInfo, name: str) -> str:
        p = self.policy
        if m.isdir():
            return "d"
        if m.issym():
            self._symlink(m, name)
            return "l"
        if m.islnk():
            target = self._path(m, m.linkname, "hard link target")
            kind = self.kinds.get(target)
            if kind is None:
                raise self.refuse(m, f"hard link to {m.linkname!r}, not an earlier member")
            if kind == "d":
                raise self.refuse(m, f"hard link to the directory {m.linkname!r}")
            return kind  # a hard link to a symlink is a symlink
        if m.ischr() or m.isblk():
            whiteout = m.ischr() and m.devmajor == 0 and m.devminor == 0
            if not (whiteout and p.whiteouts):
                device = "char" if m.ischr() else "block"
                allowed = "only overlay whiteouts (char 0:0)" if p.whiteouts else "none"
                raise self.refuse(
                    m, f"{device} device {m.devmajor}:{m.devminor} ({p.what}s hold {allowed})"
                )
            return "f"
        if m.isfifo():
            if not p.fifos:
                raise self.refuse(m, f"a fifo ({p.what}s hold none)")
            return "f"
        if not p.setid:
            if m.mode & (stat.S_ISUID | stat.S_ISGID):
                raise self.refuse(m, f"setuid/setgid mode {m.mode:o} ({p.what}s hold none)")
            caps = [k for k in m.pax_headers if k.startswith(_XATTR_PREFIXES)]
            if any(k.endswith(".security.capability") for k in caps):
                raise self.refuse(m, f"a file capability ({p.what}s hold none)")
        return "f"

    def _symlink(self, m: tarfile.TarInfo, name: str) -> None:
        target = m.linkname
        if not target:
            raise self.refuse(m, "a symlink to nothing")
        if len(target.encode(errors="surrogateescape")) > PATH_MAX:
            raise self.refuse(m, f"symlink target longer than {PATH_MAX} bytes")
        if self.policy.container_links:
            return  # the container's own; see the module's docstring
        if target.startswith("/"):
            raise self.refuse(m, f"symlink to the absolute path {target!r}")
        parts = _parts(target)
        ups = next((i for i, part in enumerate(parts) if part != ".."), len(parts))
        if ".." in parts[ups:]:
            raise self.refuse(m, f"symlink to {target!r}: `..` after a name may climb out")
        if ups > name.count("/"):
            raise self.refuse(m, f"symlink to {target!r} points outside the directory")


def _zeros_after(f: IO[bytes], offset: int) -> bool:
    f.seek(offset)
    while chunk := f.read(CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _agree(member: tarfile.TarInfo, gnu: tuple[str, bytes, bytes | None, str] | None) -> str:
    """Why GNU tar's reading of a member differs from Python's, or ""."""
    letter = _GNU_TYPE[member.type]
    name = member.name.encode(errors="surrogateescape").rstrip(b"/")
    link = member.linkname.encode(errors="surrogateescape") if member.linkname else None
    ours = (letter, name, link if member.issym() or member.islnk() else None)
    if gnu is None:
        return f"GNU tar lists nothing for it (Python reads {ours!r})"
    theirs = (gnu[0], gnu[1].rstrip(b"/"), gnu[2])
    if ours != theirs:
        return f"GNU tar reads it as {theirs!r}, Python as {ours!r}"
    if (member.ischr() or member.isblk()) and gnu[3] != f"{member.devmajor},{member.devminor}":
        return f"GNU tar reads device {gnu[3]}, Python {member.devmajor},{member.devminor}"
    return ""


def check(tar_path: Path, policy: Policy) -> Checked:
    """Read `tar_path` (a plain tar) and refuse it (UnsafeArchive) unless every member
    keeps to `policy` and the module's rules; nothing is unpacked."""
    size = tar_path.stat().st_size
    if size > policy.max_bytes:
        raise UnsafeArchive(
            f"{policy.what}: the archive is {_gib(size)}, above the cap of {_gib(policy.max_bytes)}"
        )
    walk = _Walk(policy)
    try:
        with _listing(tar_path) as gnu, tar_path.open("rb") as f:
            with tarfile.open(fileobj=f, mode="r:", tarinfo=BoundedHeaderInfo) as tar:
                while (member := tar.next()) is not None:
                    cast(Any, tar).members.clear()  # stream: keep no list of members
                    walk.member(member)
                    try:
                        why = _agree(member, gnu.next())
                    except ValueError as exc:
                        why = str(exc)
                    if why:
                        raise walk.refuse(member, f"{why}: an ambiguous archive")
                end = tar.offset
            if not _zeros_after(f, end):
                raise UnsafeArchive(f"{policy.what}: data after the end of the archive (at {end})")
            why = gnu.finish()
            if why:
                raise UnsafeArchive(f"{policy.what}: {why}: an ambiguous archive")
    except (tarfile.TarError, ValueError, IndexError, KeyError, EOFError) as exc:
        # A header Python's reader cannot make sense of (a bad sparse map, a pax number).
        raise UnsafeArchive(f"{policy.what}: not a readable tar: {exc}") from exc
    return Checked(
        members=walk.members,
        tops=frozenset(walk.tops),
        assumed=frozenset(walk.assumed),
    )


def check_on_disk(
    root: Path, checked: Checked, what: str, *, removed: Collection[str] = ()
) -> None:
    """Refuse to unpack into `root` if a directory the archive writes into without holding
    it is, on disk, reached through a symlink (GNU tar would write through it). A path in
    `removed` is one the caller removes before unpacking: what is below it does not count."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeArchive(f"{what}: {root} is not a directory")
    for rel in sorted(checked.assumed):
        path = root
        parts = rel.split("/")
        for depth, part in enumerate(parts, 1):
            path = path / part
            if "/".join(parts[:depth]) in removed:
                break  # tar makes it anew, as a directory
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break  # tar makes it, as a directory
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchive(
                    f"{what}: members below {rel!r} would go through the symlink "
                    f"{str(path.relative_to(root))!r} already in {root}"
                )


def extract_argv(tar_path: Path, into: Path, *names: str) -> list[str]:
    """GNU tar unpacking `tar_path` (all of it, or the members `names`) into `into`,
    keeping owners, modes, xattrs, sparse files; after `check` and `check_on_disk`."""
    return ["tar", *TAR_FLAGS, "-xpf", str(tar_path), "-C", str(into), *names]


def unpack(tar_path: Path, into: Path, policy: Policy, *, timeout: float) -> Checked:
    """Check `tar_path`, then unpack it into `into` (made if missing) with GNU tar."""
    checked = check(tar_path, policy)
    into.mkdir(parents=True, exist_ok=True)
    check_on_disk(into, checked, policy.what)
    # The deadline is kept by coreutils' `timeout`, outside this process: a worker run
    # under libfaketime (the lab's clock tests) gets EINVAL from subprocess's own timed wait.
    run(
        ["timeout", "--kill-after=5", f"{timeout:.0f}", *extract_argv(tar_path, into)], timeout=None
    )
    return checked
