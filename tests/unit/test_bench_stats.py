"""The bench's arithmetic: medians and spreads of samples, the longest gap a client saw, the
freeze of a migration record cut into its steps and hops, and what it reads from wrk and the
Minecraft demo's report."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.bench.client import Gaps
from deploy.bench.game import game_moves
from deploy.bench.run import Cell, FerryRun, row_of
from deploy.bench.stats import (
    FreezeWindow,
    freeze_slices,
    freeze_window,
    hops_ms,
    span_durations,
    spread,
    step_timings,
)
from deploy.bench.web import WebMove, WebRun, read_wrk, web_table

FROZE = 1000.0  # the dump's frozen_at


def step(name: str, start: float, end: float, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "forward", "status": "done", "started_at": start,
            "finished_at": end, **extra}  # fmt: skip


STEPS = [
    step("presync_files", 998.0, 999.5),
    step("dump", 999.9, 1000.400),
    step("transfer", 1000.410, 1000.500),
    step("restore", 1000.520, 1000.800),
    step("verify", 1000.810, 1000.850),
    step("commit", 1000.860, 1000.870),
    step("open_network", 1000.880, 1000.990),
    step("clean_source", 1001.0, 1001.2),
]


def record(opened: dict[str, Any] | None = None, steps: list[dict[str, Any]] = STEPS) -> dict:
    results: dict[str, Any] = {"dump": {"frozen_at": FROZE, "dump_ms": 400}}
    if opened is not None:
        results["open_network"] = opened
    return {"state": "completed", "steps": steps, "results": results}


def test_spread_is_the_median_and_the_range_of_the_known_values() -> None:
    got = spread([3.0, None, 1.0, 10.0])
    assert got is not None
    assert (got.median, got.low, got.high, got.n) == (3.0, 1.0, 10.0, 3)
    assert got.text() == "3 (1-10)"
    assert spread([None]) is None
    one = spread([1493.21])
    assert one is not None and one.text() == "1493"
    even = spread([2.0, 4.0])
    assert even is not None and even.median == 3.0


def test_gaps_keep_the_longest_and_where_it_was() -> None:
    gaps = Gaps()
    for t, n in [(0.0, 0), (0.001, 1), (0.002, 2), (0.9, 3), (0.901, 4), (0.95, 5)]:
        gaps.seen(t, n)
    assert gaps.longest == pytest.approx(0.898)
    assert (gaps.start, gaps.end, gaps.after) == (0.002, 0.9, 2)
    assert gaps.over_10ms == 2
    assert (gaps.first, gaps.last, gaps.count) == (0.0, 0.95, 6)


def test_one_message_is_no_gap() -> None:
    gaps = Gaps()
    gaps.seen(5.0, 0)
    assert gaps.longest == 0.0 and gaps.over_10ms == 0


def test_the_freeze_ends_at_opened_at_when_the_runtime_records_it() -> None:
    window = freeze_window(record({"frozen_to_open_ms": 960, "opened_at": 1000.950}))
    assert window == FreezeWindow(FROZE, 1000.950, "open_network.opened_at")
    assert window.ms == 950.0


def test_without_opened_at_the_freeze_ends_with_the_open_network_step() -> None:
    window = freeze_window(record({"frozen_to_open_ms": 990}))
    assert window == FreezeWindow(FROZE, 1000.990, "open_network step end")


def test_no_freeze_without_a_dump_or_an_open_network() -> None:
    assert freeze_window({"results": {}, "steps": STEPS}) is None
    not_opened = [s for s in STEPS if s["name"] != "open_network"]
    assert freeze_window(record(None, not_opened)) is None


def test_a_retried_or_undone_open_network_is_not_the_opening() -> None:
    steps = [*STEPS[:-2], step("open_network", 1000.880, 1000.990, status="failed"),
             step("open_network", 1000.880, 1000.995, kind="compensation")]  # fmt: skip
    assert freeze_window(record(None, steps)) is None


def test_the_slices_add_up_to_the_freeze() -> None:
    window = FreezeWindow(FROZE, 1000.950, "open_network.opened_at")
    slices = freeze_slices(STEPS, window)
    assert list(slices) == [
        "dump", "hop dump>transfer", "transfer", "hop transfer>restore", "restore",
        "hop restore>verify", "verify", "hop verify>commit", "commit", "hop commit>open_network",
        "open_network",
    ]  # fmt: skip
    assert slices["dump"] == 400.0  # from the frozen instant, not the step's start
    assert slices["open_network"] == 70.0  # up to the opening, not the step's end
    assert slices["hop dump>transfer"] == 10.0
    assert sum(slices.values()) == pytest.approx(window.ms)
    assert hops_ms(slices) == 60.0
    assert "presync_files" not in slices and "clean_source" not in slices


def test_time_after_the_last_known_step_is_a_hop_of_its_own() -> None:
    window = FreezeWindow(FROZE, 1001.5, "open_network.opened_at")
    slices = freeze_slices(STEPS[:3], window)
    assert slices["hop transfer>open"] == 1000.0
    assert sum(slices.values()) == pytest.approx(window.ms)


def test_span_durations_take_the_last_span_of_each_name() -> None:
    spans = [
        {"name": "criu.dump", "start": 1_000_000_000, "end": 1_400_000_000},
        {"name": "criu.dump", "start": 2_000_000_000, "end": 2_250_000_000},
        {"name": "network.cutover", "start": 3_000_000_000, "end": 3_070_000_000},
    ]
    assert span_durations(spans, ["criu.dump", "network.cutover", "criu.restore"]) == {
        "criu.dump": 250.0,
        "network.cutover": 70.0,
    }


def test_the_workers_step_spans_show_the_hops_the_record_hides() -> None:
    spans = [
        {"name": "step dump", "status": "ok", "start": 999_900_000_000, "end": 1_000_400_000_000,
         "attributes": {"ferry.step_kind": "forward"}},
        {"name": "criu.dump", "status": "unset", "start": 999_950_000_000,
         "end": 1_000_300_000_000},
        {"name": "step transfer", "status": "ok", "start": 1_000_430_000_000,
         "end": 1_000_500_000_000, "attributes": {"ferry.step_kind": "forward"}},
    ]  # fmt: skip
    steps = step_timings(spans)
    assert [s["name"] for s in steps] == ["dump", "transfer"]
    slices = freeze_slices(steps, FreezeWindow(FROZE, 1000.5, "open_network.opened_at"))
    assert slices == {"dump": 400.0, "hop dump>transfer": 30.0, "transfer": 70.0}


def test_wrk_errors_and_its_longest_request() -> None:
    run = WebRun("post-copy")
    read_wrk(run, {
        "requests": 52000, "duration_us": 18_400_000, "bytes": 1,
        "errors": {"connect": 0, "read": 2, "write": 0, "status": 0, "timeout": 1},
        "latency_us": {"max": 1_234_567, "mean": 900.0, "p50": 300, "p99": 4100, "p999": 90000},
    })  # fmt: skip
    assert run.error_total == 3 and run.errors["read"] == 2
    assert run.longest_request_ms == 1234.6 and run.p99_ms == 4.1 and run.seconds == 18.4


def test_the_worst_bot_makes_a_moves_tick_gap() -> None:
    report = {"moves": [{"strategy": "post-copy", "source": "h1", "destination": "h2",
                         "state": "completed", "freeze_ms": 569, "blocks_ok": True,
                         "time_gap_ms": {"ferry0": 1915, "ferry1": 2525}}]}  # fmt: skip
    (move,) = game_moves(report)
    assert move.longest_tick_gap_ms == 2525 and move.freeze_ms == 569 and move.blocks_ok


def ferry_run(tcp: float, freeze: float, **extra: Any) -> FerryRun:
    slices = {"dump": freeze - 10, "hop dump>transfer": 10.0}
    return FerryRun("post-copy", 64, "completed", tcp_pause_ms=tcp, push_pause_ms=tcp + 1,
                    pause_ms=tcp - 1, freeze_ms=freeze, memory_ok=True, slices_ms=slices,
                    **extra)  # fmt: skip


def test_a_cell_row_is_medians_of_the_samples_that_count_and_fails_on_a_reset() -> None:
    cell = Cell("post-copy", 64, ferry=[
        ferry_run(900, 500), ferry_run(1100, 700), ferry_run(1000, 600),
        ferry_run(5000, 550, reconnects=1, resets=["tcp: EOF at 1.0"]),
    ])  # fmt: skip
    row = row_of(cell)
    assert row["status"] == "failed" and "TCP CONNECTION RESET" in row["reason"]
    assert (row["samples"], row["completed"], row["reconnects"]) == (4, 3, 1)
    assert row["tcp_pause_ms"] == 1000.0
    assert row["spread"]["tcp_pause_ms"] == {"median": 1000.0, "min": 900.0, "max": 1100.0, "n": 3}
    assert row["slices_ms"] == {"dump": 590.0, "hop dump>transfer": 10.0}
    assert row["hops_ms"] == 10.0 and row["baseline_ok"] is None


def test_a_refused_strategy_is_unavailable_not_failed() -> None:
    row = row_of(Cell("pre-copy", 64, ferry=[FerryRun("pre-copy", 64, "unavailable", "no")]))
    assert row["status"] == "unavailable" and row["reason"] == "no"


def test_the_web_table_names_each_server_and_cuts_each_freeze_into_steps() -> None:
    move = WebMove(
        "h1",
        "h2",
        state="completed",
        freeze_ms=97.0,
        slices_ms={"dump": 41.0, "hop dump>transfer": 12.0, "restore": 44.0},
    )
    run = WebRun("stop-and-copy", server="busybox httpd", ok=True, moves=[move])
    table = web_table([run])
    assert "busybox httpd stop-and-copy" in table.splitlines()[2].replace("  ", " ")
    assert "h1->h2 97" in table
    assert "busybox httpd stop-and-copy h1->h2: dump 41, hop dump>transfer 12, restore 44" in table
