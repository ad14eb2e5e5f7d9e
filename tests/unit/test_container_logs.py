"""A container's log as daemontools' multilog writes it: read whole, by tail, and after a
cursor that holds across rotation; the size cap; the directory's lock told apart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.errors import InvalidInput
from services.runtime import container_logs
from services.runtime.container_logs import Cursor

FILE_BYTES = 4096  # multilog's smallest file
FILES = 3


async def write_lines(log_dir: Path, first: int, count: int, files: int = FILES) -> None:
    logger = await container_logs.start_logger(log_dir, FILE_BYTES, files)
    with os.fdopen(logger.fd, "wb") as pipe:
        for i in range(first, first + count):
            pipe.write(f"line {i:05d} {'x' * 40}\n".encode())
    # The logger ends at the pipe's end, once it wrote everything.
    assert await asyncio.wait_for(logger.process.wait(), 10.0) == 0
    assert await container_logs.wait_unlocked(log_dir, 1.0)


def numbers(lines: list[container_logs.LogLine]) -> list[int]:
    return [int(line.text.split()[1]) for line in lines]


async def test_lines_come_back_in_order_stamped_and_capped(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    await write_lines(log_dir, 0, 50)
    lines, cursor = container_logs.read(log_dir)
    assert numbers(lines) == list(range(50))
    assert all(line.at is not None and abs(line.at - lines[0].at) < 60 for line in lines)
    # A second logger (the container restored on this host) appends to the same log.
    await write_lines(log_dir, 50, 10)
    more, _ = container_logs.read(log_dir, after=cursor)
    assert numbers(more) == list(range(50, 60))
    assert numbers(container_logs.read(log_dir, tail=3)[0]) == [57, 58, 59]
    assert container_logs.read(log_dir, tail=0)[0] == []

    # Far more than the cap: the oldest files go, the newest lines stay, in order.
    await write_lines(log_dir, 60, 2000)
    sizes = [
        p.stat().st_size for p in log_dir.iterdir() if p.name == "current" or p.name.startswith("@")
    ]
    assert len(sizes) <= FILES and all(size <= FILE_BYTES for size in sizes)
    kept = numbers(container_logs.read(log_dir)[0])
    assert kept[-1] == 2059 and kept == list(range(kept[0], 2060)) and kept[0] > 1000


async def test_a_cursor_survives_rotation_in_between(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    await write_lines(log_dir, 0, 20, files=20)
    lines, cursor = container_logs.read(log_dir)
    await write_lines(log_dir, 20, 100, files=20)  # rotates: current moves aside, and again
    assert any(p.name.startswith("@") for p in log_dir.iterdir())
    after, cursor = container_logs.read(log_dir, after=Cursor.decode(cursor.encode()))
    assert numbers(lines) + numbers(after) == list(range(120))
    assert container_logs.read(log_dir, after=cursor)[0] == []


def test_a_half_written_line_waits_and_a_bad_cursor_is_refused(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "current").write_bytes(b"@400000006500000000000000 whole\npart")
    lines, cursor = container_logs.read(log_dir)
    assert [line.text for line in lines] == ["whole"] and cursor.offset == 32
    with pytest.raises(InvalidInput):
        Cursor.decode("x,@1")


def test_an_unheld_dir_is_not_locked(tmp_path: Path) -> None:
    assert asyncio.run(container_logs.wait_unlocked(tmp_path, 0.1))
