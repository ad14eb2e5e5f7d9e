"""A background CRIU that is ready before its shell wrote the pid file (a loaded host)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.errors import RuntimeFailure
from services.runtime import criu, paths


async def test_a_pid_written_after_ready_is_waited_for(tmp_path: Path) -> None:
    (tmp_path / "lazy-pages.status").write_bytes(b"\0")
    pid_file = paths.pid_file(tmp_path, "lazy-pages")
    pid_file.write_text("")  # the shell's `>` made it; its echo has not run yet

    async def shell_writes_later() -> None:
        await asyncio.sleep(0.1)
        pid_file.write_text("4242\n")

    writing = asyncio.create_task(shell_writes_later())
    assert await criu.wait_ready(tmp_path, "lazy-pages", 5.0) == 4242
    await writing


async def test_a_pid_never_written_is_a_failure_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(criu, "PID_GRACE_S", 0.1)
    (tmp_path / "page-server.status").write_bytes(b"\0")
    with pytest.raises(RuntimeFailure, match="its pid was never written"):
        await criu.wait_ready(tmp_path, "page-server", 0.1)
