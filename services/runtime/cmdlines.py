"""Every runc and CRIU command line Ferry runs, built in one place.

Pure functions: they build an argv and run nothing. The CRIU options that every image of a
dump chain must share (pre-dumps, the final dump and the restore) are one constant, so the
two sides of a move cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from services.tls import TlsFiles

CRIU = os.environ.get("FERRY_CRIU", "/usr/local/sbin/criu")
STATUS_FD = "{status-fd}"  # criu.start_background puts the real fd number here

# Established TCP connections travel; cgroups are CRIU-managed softly (runc made them).
# Every dump in a chain and its restore must agree on these.
CRIU_CHAIN_FLAGS = ("--tcp-established", "--manage-cgroups-mode", "soft")


class RuncRoot(Protocol):
    """A host's runc: its binary and its own state root."""

    @property
    def binary(self) -> str: ...

    @property
    def root(self) -> Path: ...


def runc(rt: RuncRoot, *args: str, log_file: Path | None = None) -> list[str]:
    """runc with this host's root; with a log file, runc (and CRIU through it) log JSON there."""
    logging = ["--log", str(log_file), "--log-format", "json"] if log_file else []
    return [rt.binary, "--root", str(rt.root), "--criu", CRIU, *logging, *args]


def runc_run_detached(rt: RuncRoot, name: str, bundle: Path, log_file: Path) -> list[str]:
    return runc(rt, "run", "--detach", "--bundle", str(bundle), name, log_file=log_file)


def runc_resume(rt: RuncRoot, name: str) -> list[str]:
    """Thaw a container's freezer cgroup (`runc pause`'s, or one a killed CRIU left)."""
    return runc(rt, "resume", name)


def runc_checkpoint(
    rt: RuncRoot,
    name: str,
    images: Path,
    log_file: Path,
    *,
    page_server: str,
    parent: str | None = None,
    pre_dump: bool = False,
    lazy_pages: bool = False,
) -> list[str]:
    """Freeze and dump `name` into `images`, its pages to `page_server` (address:port).

    `pre_dump`: a pre-copy round — the container runs on. `parent` (relative to `images`,
    e.g. ../it-2): send only what changed since that round. `lazy_pages`: post-copy — CRIU
    serves the pages from `page_server` on this host and reports readiness on STATUS_FD;
    the container is left running from runc's view, stopped by CRIU's leave-stopped config.
    Its work path is its image directory, so each dump leaves its own stats-dump there.
    """
    return runc(
        rt, "checkpoint", *(["--pre-dump"] if pre_dump else []),
        "--image-path", str(images), "--work-path", str(images),
        *(["--lazy-pages"] if lazy_pages else []),
        "--page-server", page_server,
        *(["--parent-path", parent] if parent is not None else []),
        *(["--status-fd", STATUS_FD, "--leave-running"] if lazy_pages else []),
        *CRIU_CHAIN_FLAGS, name, log_file=log_file,
    )  # fmt: skip


def runc_restore(
    rt: RuncRoot, name: str, images: Path, bundle: Path, log_file: Path, *, lazy_pages: bool
) -> list[str]:
    """Restore `name` from `images` with `bundle`'s config, detached; with `lazy_pages`,
    its memory comes from a lazy-pages daemon whose work dir is `images`."""
    return runc(
        rt, "restore", "--detach", "--image-path", str(images), "--work-path", str(images),
        "--bundle", str(bundle), *(["--lazy-pages"] if lazy_pages else []),
        *CRIU_CHAIN_FLAGS, name, log_file=log_file,
    )  # fmt: skip


def criu_check(feature: str | None = None) -> list[str]:
    return [CRIU, "check", *(["--feature", feature] if feature else [])]


def criu_page_server(
    images: Path,
    address: str,
    port: int,
    *,
    parent: str | None = None,
    status_fd: int | str = STATUS_FD,
    tls: TlsFiles | None = None,
) -> list[str]:
    """A page server that takes one (pre-)dump's pages into `images`, then exits.

    `parent` (relative to `images`, e.g. ../it-2) links the previous round's images, which
    is what lets it accept an incremental dump; it must already exist. With `tls`, the
    pages come over TLS from a client with a certificate of the CA.
    """
    return [
        CRIU, "page-server", "--images-dir", str(images), "--work-dir", str(images),
        *(["--prev-images-dir", parent] if parent is not None else []),
        "--address", address, "--port", str(port), "--status-fd", str(status_fd),
        *criu_tls(tls, listening=True), "-v4", "-o", "page-server.log",
    ]  # fmt: skip


def criu_lazy_pages(
    images: Path, source: str, port: int, *, tls: TlsFiles | None = None
) -> list[str]:
    """The destination's lazy-pages daemon, pulling from the source's page server (over
    TLS, the source's certificate checked against its address, with `tls`)."""
    return [
        CRIU, "lazy-pages", "--page-server", "--address", source, "--port", str(port),
        "--images-dir", str(images), "--work-dir", str(images), "--status-fd", STATUS_FD,
        *criu_tls(tls, listening=False), "-v4", "-o", "lazy-pages.log",
    ]  # fmt: skip


def criu_tls(tls: TlsFiles | None, *, listening: bool) -> list[str]:
    """CRIU's TLS options. The connecting side checks the peer's certificate against the
    address it dials (an IP SAN). The listening side would check the client's certificate
    against its *own* address, which no peer's names: it checks the CA only
    (`--tls-no-cn-verify`), and the firewall admits the one peer (services/runtime/
    firewall.py `admit_only`)."""
    if tls is None:
        return []
    files = ["--tls-cacert", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    return ["--tls", *files, *(["--tls-no-cn-verify"] if listening else [])]
