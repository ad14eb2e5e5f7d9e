"""Reading the lazy-pages daemon's signs of life from what it leaves on disk."""

from __future__ import annotations

import os
from pathlib import Path

from services.runtime import lazy_pages, paths


def test_a_running_daemon_is_seen_alive_with_its_last_page_count(tmp_path: Path) -> None:
    log = tmp_path / "lazy-pages.log"
    log.write_bytes(
        b"(00.1) 1-5: uffd_copy: 0x7f00/4096\n"
        b"(00.2) 1-5: UFFD transferred pages: (10/300)\n"
        b"(00.3) 1-5: UFFD transferred pages: (42/300)\n"
    )
    # This very test process stands in for the daemon: its cmdline must name criu lazy-pages.
    pid = os.getpid()
    paths.pid_file(tmp_path, paths.LAZY_PAGES).write_text(str(pid))
    view = lazy_pages.look(tmp_path, log)
    assert view.rc is None and view.logged_bytes == log.stat().st_size
    assert (view.copied_pages, view.total_pages) == (42, 300)
    assert not view.alive  # a pid that is not a criu lazy-pages process is not the daemon


def test_an_ended_daemon_reports_its_exit_code_and_is_not_alive(tmp_path: Path) -> None:
    paths.rc_file(tmp_path, paths.LAZY_PAGES).write_text("1\n")
    view = lazy_pages.look(tmp_path, tmp_path / "missing.log")
    assert view.rc == 1 and not view.alive and view.logged_bytes == 0
    assert view.copied_pages is None
