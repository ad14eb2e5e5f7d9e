"""Pre-copy on the host: its rounds' layout, their command lines, and whether this kernel allows it.

Each iteration has its own image directory, it-1, it-2, …, and the final dump's is `images`
beside them, on both hosts. CRIU chains them with a relative `parent` symlink: on the source
runc's --parent-path (relative to --image-path, which runc insists on) makes it, on the
destination the page server's --prev-images-dir does (P.Haul sent the same `parent_img` to
both). With a parent, the page server tells the dumper so, stores only the pages that
changed and checks that every unchanged range exists in the parent; restore then follows
the links from `images` back to it-1. So ../it-(N-1) must exist on both hosts before
iteration N starts, and a way back to the source needs the whole chain, not only `images`.

A page server takes one (pre-)dump and exits: start a fresh one for every iteration.
Only where `criu check --feature mem_dirty_track` passes: without the kernel's soft-dirty
bits a pre-dump cannot tell which pages changed (CRIU aborts, runc says features are missing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.errors import RuntimeFailure
from services.runtime import cmdlines
from services.runtime.proc import arun
from services.runtime.runc import Runc
from services.tls import TlsFiles

FEATURE = "mem_dirty_track"
FEATURE_CHECK_TIMEOUT_S = 30.0
FINAL_DIR = "images"  # where MigrationPaths.images is, so restore reads the usual place

_CRIU_PREFIX = re.compile(r"^\s*(?:Warn|Error)\s*\([^)]*\):\s*")


@dataclass(frozen=True)
class PrecopyLayout:
    """Where each iteration's images live under one migration's directory (same on both hosts)."""

    root: Path

    def iteration(self, n: int) -> Path:
        if n < 1:
            raise ValueError(f"pre-dump iterations count from 1, not {n}")
        return self.root / f"it-{n}"

    def parent_of(self, n: int) -> str | None:
        """Iteration n's parent, relative to its own directory; the first has none."""
        return None if n == 1 else f"../{self.iteration(n - 1).name}"

    @property
    def final(self) -> Path:
        return self.root / FINAL_DIR

    def final_parent(self, last_iteration: int) -> str:
        return f"../{self.iteration(last_iteration).name}"


def pre_dump_argv(
    runc: Runc, name: str, layout: PrecopyLayout, n: int, page_server: str, *, log_file: Path
) -> list[str]:
    """Iteration n: the pages dirtied since n-1 go to the page server; the container runs on."""
    return cmdlines.runc_checkpoint(
        runc, name, layout.iteration(n), log_file,
        page_server=page_server, parent=layout.parent_of(n), pre_dump=True,
    )  # fmt: skip


def final_dump_argv(
    runc: Runc,
    name: str,
    layout: PrecopyLayout,
    last_iteration: int,
    page_server: str,
    *,
    log_file: Path,
) -> list[str]:
    """The frozen dump: only what changed since the last pre-dump; the source copy stops."""
    return cmdlines.runc_checkpoint(
        runc, name, layout.final, log_file,
        page_server=page_server, parent=layout.final_parent(last_iteration),
    )  # fmt: skip


def page_server_argv(
    images: Path,
    address: str,
    port: int,
    *,
    status_fd: int | str,
    parent: str | None,
    tls: TlsFiles | None = None,
) -> list[str]:
    """The destination's page server for one iteration (or the final dump), chained to
    `parent` (relative to `images`, e.g. "../it-2"), which must already exist."""
    return cmdlines.criu_page_server(
        images, address, port, parent=parent, status_fd=status_fd, tls=tls
    )


async def mem_dirty_track_available() -> tuple[bool, str]:
    """Whether this host can pre-copy, and why not: CRIU's own check of soft-dirty tracking."""
    argv = cmdlines.criu_check(FEATURE)
    command = f"criu check --feature {FEATURE}"
    try:
        done = await arun(argv, check=False, timeout=FEATURE_CHECK_TIMEOUT_S)
    except RuntimeFailure as exc:
        return False, f"{command} could not run: {exc.reason}"
    lines = [
        _CRIU_PREFIX.sub("", line).strip() for line in (done.stderr + done.stdout).splitlines()
    ]
    said = " ".join(line for line in lines if line)[:300]  # CRIU says it in a line or two
    if done.returncode == 0:
        return True, f"{command}: {said or 'supported'}"
    if "dirty tracking" in said.lower():
        return False, (
            f"no soft-dirty memory tracking in this kernel (CONFIG_MEM_SOFT_DIRTY):"
            f' {command} says "{said}"; pre-dumps cannot tell which pages changed'
        )
    return False, f"{command} exited {done.returncode}: {said or 'no output'}"
