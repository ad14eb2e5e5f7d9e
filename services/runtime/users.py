"""A container's user, resolved in its own root filesystem the way Docker resolves `--user`.

`NAME` or `UID` alone: the uid, and the primary gid from the image's /etc/passwd (a uid it
does not list runs with gid 0); the groups /etc/group lists the user in become the
additional gids. `X:Y`: Y is a gid or a group name from /etc/group, and no other group is
added. A name the files do not hold is refused, naming the file.

The root filesystem is the container's, untrusted: its files are opened one path part at a
time relative to the directory above, never following a symlink (an /etc/passwd linking to
the host's /etc/shadow is refused, not read), and at most FILE_MAX bytes are read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from schemas.v1.containers import ProcessUser
from services.errors import InvalidInput

FILE_MAX = 4 << 20
NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _fd(path: str | Path, flags: int, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def read_in_root(root: Path, relative: str) -> str | None:
    """A file of the container's tree, or None if it has none; a symlink or a non-regular
    file on the way is refused."""
    parts = [p for p in relative.split("/") if p]
    try:
        with _fd(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) as top:
            current = os.dup(top)
            try:
                for part in parts[:-1]:
                    below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | NO_FOLLOW, dir_fd=current)
                    os.close(current)
                    current = below
                with _fd(parts[-1], os.O_RDONLY | NO_FOLLOW | os.O_NONBLOCK, current) as fd:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise InvalidInput(
                            f"/{relative} in the image is not a regular file", field="--user"
                        )
                    data = os.read(fd, FILE_MAX + 1)
            finally:
                os.close(current)
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink; ENOTDIR: a file where a directory should be
        raise InvalidInput(
            f"/{relative} in the image cannot be read safely ({exc.strerror}): a symlink on"
            " its path is not followed",
            field="--user",
        ) from None
    if len(data) > FILE_MAX:
        raise InvalidInput(
            f"/{relative} in the image is larger than {FILE_MAX} bytes", field="--user"
        )
    return data.decode(errors="replace")


def _entries(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and line[0] != "#"]


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) <= 2**32 - 2 else None


def resolve(root: Path, asked: str) -> ProcessUser:
    """`asked` (UID[:GID] or NAME[:GROUP]) as ids, looked up in `root`'s /etc files."""
    who, _, group = asked.partition(":")
    passwd = _entries(read_in_root(root, "etc/passwd"))
    uid = _number(who)
    entry = next(
        (e for e in passwd if len(e) >= 4 and (e[0] == who or (uid is not None and e[2] == who))),
        None,
    )
    if uid is None:
        if entry is None:
            raise InvalidInput(f"no user {who!r} in the image's /etc/passwd", field="--user")
        uid = _number(entry[2])
        if uid is None:
            raise InvalidInput(f"user {who!r} has no valid uid in /etc/passwd", field="--user")
    groups = _entries(read_in_root(root, "etc/group"))
    if group:
        gid = _number(group)
        if gid is None:
            found = next((g for g in groups if len(g) >= 3 and g[0] == group), None)
            gid = _number(found[2]) if found is not None else None
            if gid is None:
                raise InvalidInput(f"no group {group!r} in the image's /etc/group", field="--user")
        return ProcessUser(uid=uid, gid=gid, asked=asked)
    gid = _number(entry[3]) if entry is not None else 0
    if gid is None:
        raise InvalidInput(f"user {who!r} has no valid gid in /etc/passwd", field="--user")
    name = entry[0] if entry is not None else None
    extra = sorted(
        {
            g_id
            for g in groups
            if len(g) >= 4 and name is not None and name in g[3].split(",")
            if (g_id := _number(g[2])) is not None and g_id != gid
        }
    )
    return ProcessUser(uid=uid, gid=gid, additional_gids=tuple(extra), asked=asked)
