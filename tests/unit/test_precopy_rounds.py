"""The pre-copy step's loop, on SYNTHETIC pre-dump statistics (this kernel cannot pre-dump).

The host is a stand-in that returns made-up CRIU statistics per round; what is checked is
the step's own logic: the page servers it asks the destination for (each chained to the
previous round), when it stops, and the result it hands to the final dump.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from schemas.v2.migrations import MigrationOptions, MigrationRecord, StepCommand
from schemas.v2.results import PrecopyResult
from services.runtime.source_side import SourceSide
from services.saga.steps import StepOutcome, StepRun
from services.source.handlers import Source

MIB_PAGES = 256


def _stats(dirty_mib: int, send_ms: int) -> dict[str, int]:
    return {
        "pages_scanned": 512 * MIB_PAGES,
        "pages_written": dirty_mib * MIB_PAGES,
        "freezing_time": 500,
        "frozen_time": 20_000,
        "memdump_time": 15_000,
        "memwrite_time": send_ms * 1000,
    }


class SyntheticHost:
    """Returns a synthetic sequence of per-round statistics."""

    def __init__(self, rounds: list[dict[str, int]]) -> None:
        self.rounds = rounds
        self.dumped: list[tuple[int, str]] = []

    async def pre_dump(self, name: str, migration_id: str, n: int, page_server: str) -> Any:
        self.dumped.append((n, page_server))
        return self.rounds[n - 1]


def _run(host: SyntheticHost, budget_ms: int) -> tuple[StepOutcome, list[Any], list[str]]:
    asked: list[Any] = []
    said: list[str] = []

    async def page_server_for(dest: str, mid: str, images: str, parent: str | None) -> str:
        asked.append((dest, images, parent))
        return f"10.0.0.2:{7000 + len(asked)}"

    async def progress(text: str, done: int | None = None, total: int | None = None) -> None:
        said.append(text)

    cmd = StepCommand(
        migration_id="0123456789abcdef", step="precopy_rounds", attempt=1, host="h1",
        role="source",
    )  # fmt: skip
    record = MigrationRecord(
        id=cmd.migration_id, container="c", source="h1", destination="h2",
        strategy={"chosen": "pre-copy", "reason": "test"},  # type: ignore[arg-type]
        trace_id="0" * 32, traceparent="", created_at=0, updated_at=0, deadline=0,
        options=MigrationOptions(downtime_budget_ms=budget_ms),
    )  # fmt: skip
    # Only what the pre-copy loop touches is real: the side's pre_dump and the page servers.
    role = Source(
        side=cast(SourceSide, host), containers=cast(Any, None), placements=cast(Any, None),
        peers=cast(Any, None), page_server_for=page_server_for, keys=cast(Any, None),
        links=cast(Any, None),
    )  # fmt: skip
    outcome = asyncio.run(role.precopy_rounds(StepRun(cmd, record), progress))
    return outcome, asked, said


def test_synthetic_converging_rounds_chain_page_servers_and_stop_within_budget() -> None:
    # 512 MiB, then 64, then 4 MiB dirty, each sent at 256 MiB/s.
    host = SyntheticHost([_stats(512, 2000), _stats(64, 250), _stats(4, 16)])
    outcome, asked, said = _run(host, budget_ms=100)
    assert [n for n, _ in host.dumped] == [1, 2, 3]
    assert asked == [
        ("h2", "it-1", None),
        ("h2", "it-2", "../it-1"),
        ("h2", "it-3", "../it-2"),
        ("h2", "images", "../it-3"),  # the final dump's page server, chained to the last round
    ]
    result = outcome.result
    assert isinstance(result, PrecopyResult)
    assert result.precopy_rounds == 3
    assert result.page_server == "10.0.0.2:7004"
    assert str(result.precopy_reason).startswith("converged")
    assert outcome.bytes_moved == (512 + 64 + 4) * 2**20
    assert len(said) == 3 and said[0].startswith("round 1:")


def test_synthetic_writer_faster_than_the_link_stops_with_the_reason() -> None:
    host = SyntheticHost([_stats(256, 1000)] * 8)
    outcome, asked, _ = _run(host, budget_ms=100)
    result = outcome.result
    assert isinstance(result, PrecopyResult)
    assert result.precopy_rounds == 2
    assert str(result.precopy_reason).startswith("not converging")
    assert asked[-1] == ("h2", "images", "../it-2")
