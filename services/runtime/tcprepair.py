"""Taking a stopped process's TCP sockets out of repair mode, from outside the process.

A post-copy dump that leaves its source stopped (CRIU's leave-stopped) leaves the source's
established sockets in TCP repair mode. Resuming the process as it is would make its next
send reset the client's connection; turning repair off first keeps the connection. The
sockets are reached through pidfd_getfd(2), which duplicates a descriptor of another
process: the setsockopt acts on the socket both descriptors share.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import struct
from pathlib import Path

SYS_PIDFD_OPEN = 434  # x86_64 and aarch64 share these numbers
SYS_PIDFD_GETFD = 438
TCP_REPAIR = 19
TCP_REPAIR_OFF = 0
TCP_ESTABLISHED = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: int) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _socket_fds(pid: int) -> list[int]:
    fds = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("socket:"):
                fds.append(int(entry.name))
    return fds


def repair_off(pid: int) -> int:
    """Turn repair mode off on every established TCP socket of `pid`; returns how many."""
    pidfd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    done = 0
    try:
        for target in _socket_fds(pid):
            try:
                fd = _syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
            except OSError:
                continue  # closed meanwhile, or not ours to take
            sock = socket.socket(fileno=fd)
            try:
                if sock.type != socket.SOCK_STREAM or sock.family not in (
                    socket.AF_INET,
                    socket.AF_INET6,
                ):
                    continue
                # tcp_info's first byte is the state; listening sockets are never in repair.
                state = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))
                if state[0] != TCP_ESTABLISHED:
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                done += 1
            finally:
                sock.close()  # closes only our duplicate
    finally:
        os.close(pidfd)
    return done
