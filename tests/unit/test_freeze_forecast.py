"""The freeze forecast: fixed cost plus the pages inside the freeze at the measured rate,
learnt from this host's earlier moves, every assumed input named; and the budget it meets."""

from __future__ import annotations

import pytest

from schemas.v2.forecast import FreezeForecast
from schemas.v2.results import DumpResult, OpenNetworkResult, StepResults
from tests.support.records import migration_record
from workflows.freeze_forecast import (
    DEFAULT_FIXED_MS,
    DEFAULT_STREAM_MIB_S,
    PastFreeze,
    forecast,
    history_of,
    past_freeze,
)
from workflows.strategy import HostFeatures, OverBudget, choose_within_budget

MIB = 2**20
NO_DIRTY = {"mem_dirty_track": "no soft-dirty memory tracking in this kernel"}
HERE = HostFeatures("h1", ("lazy_pages",), NO_DIRTY)
THERE = HostFeatures("h2", ("lazy_pages",), NO_DIRTY)


def moved(
    strategy: str, freeze_ms: int, page_mib: int, stream_ms: float, *, to: str = "h2", at: float
) -> PastFreeze:
    return PastFreeze(strategy, to, float(freeze_ms), page_mib * MIB, stream_ms, at)


def test_with_no_history_the_defaults_stand_in_and_are_named() -> None:
    fc = forecast(
        "stop-and-copy", memory_bytes=200 * MIB, memory_basis="resident memory",
        destination="h2", history=(), budget_ms=None,
    )  # fmt: skip
    pages_ms = 200 / DEFAULT_STREAM_MIB_S * 1000
    assert fc.predicted_ms == round(DEFAULT_FIXED_MS["stop-and-copy"] + pages_ms)
    assert any(m.startswith("fixed cost: no earlier stop-and-copy") for m in fc.missing)
    assert any(m.startswith("stream rate: no earlier page stream") for m in fc.missing)
    assert fc.fits, "no budget given: nothing is refused"


def test_stop_and_copy_scales_the_pages_at_the_measured_rate_and_keeps_the_fixed_cost() -> None:
    # Two 64 MiB moves to h2: 1100 ms freezes of which 400 ms streamed pages (160 MiB/s).
    history = [
        moved("stop-and-copy", 1100, 64, 400.0, at=2.0),
        moved("stop-and-copy", 1100, 64, 400.0, at=1.0),
    ]
    fc = forecast(
        "stop-and-copy", memory_bytes=512 * MIB, memory_basis="resident memory",
        destination="h2", history=history, budget_ms=None,
    )  # fmt: skip
    assert fc.fixed_ms == 700
    assert fc.stream_mib_s == 160.0
    assert fc.pages_ms == 3200  # 512 MiB at 160 MiB/s
    assert fc.predicted_ms == 3900
    assert fc.missing == ()
    assert "2 earlier stop-and-copy move(s) to h2" in fc.basis


def test_post_copy_does_not_grow_with_memory() -> None:
    history = [moved("post-copy", 650, 0, 0.0, at=1.0), moved("stop-and-copy", 900, 64, 400, at=2)]
    small, big = (
        forecast(
            "post-copy",
            memory_bytes=m * MIB,
            memory_basis="resident memory",
            destination="h2",
            history=history,
            budget_ms=None,
        )
        for m in (64, 2048)
    )
    assert small.predicted_ms == big.predicted_ms == 650
    assert big.pages_ms == 0 and big.stream_mib_s is None


def test_moves_to_the_same_destination_count_first_then_any() -> None:
    history = [
        moved("post-copy", 2000, 0, 0.0, to="h3", at=3.0),
        moved("post-copy", 600, 0, 0.0, to="h2", at=1.0),
    ]
    to_h2 = forecast(
        "post-copy", memory_bytes=0, memory_basis="resident memory",
        destination="h2", history=history, budget_ms=None,
    )  # fmt: skip
    to_h4 = forecast(
        "post-copy", memory_bytes=0, memory_basis="resident memory",
        destination="h4", history=history, budget_ms=None,
    )  # fmt: skip
    assert to_h2.predicted_ms == 600 and "to h2" in to_h2.basis
    assert to_h4.predicted_ms == 1300 and "to other hosts" in to_h4.basis  # median of both


def test_a_completed_record_teaches_its_freeze_and_an_unfinished_one_nothing() -> None:
    record = migration_record(state="completed", updated_at=5.0).model_copy(
        update={
            "results": StepResults(
                dump=DumpResult(
                    frozen_at=1.0,
                    dump_ms=500,
                    pages_written=16384,
                    criu_memdump_us=400_000,
                    criu_memwrite_us=300_000,
                ),
                open_network=OpenNetworkResult(frozen_to_open_ms=1000),
            )
        }
    )
    past = past_freeze(record)
    assert past is not None
    assert (past.page_bytes, past.stream_ms, past.fixed_ms) == (64 * MIB, 400.0, 600.0)
    assert past.stream_mib_s == 160.0
    assert past_freeze(record.model_copy(update={"state": "rolled_back"})) is None
    assert history_of([record], "h1") == [past]
    assert history_of([record], "h2") == [], "only moves this host made as the source"


def test_an_explicit_strategy_over_an_explicit_budget_is_refused_with_its_forecast() -> None:
    def forecaster(strategy: str) -> FreezeForecast:
        return forecast(
            strategy, memory_bytes=64 * MIB, memory_basis="resident memory",
            destination="h2", history=[moved("stop-and-copy", 1100, 64, 400.0, at=1.0)],
            budget_ms=300,
        )  # fmt: skip

    with pytest.raises(OverBudget, match=r"over the 300 ms downtime budget: stop-and-copy: 1100"):
        choose_within_budget("stop-and-copy", 300, HERE, THERE, forecaster)


def test_auto_passes_over_a_strategy_that_does_not_fit_for_one_that_does() -> None:
    history = [moved("post-copy", 900, 0, 0.0, at=2.0), moved("stop-and-copy", 500, 1, 5, at=1.0)]

    def forecaster(strategy: str) -> FreezeForecast:
        return forecast(
            strategy, memory_bytes=1 * MIB, memory_basis="resident memory",
            destination="h2", history=history, budget_ms=600,
        )  # fmt: skip

    choice, predicted = choose_within_budget("auto", 600, HERE, THERE, forecaster)
    assert choice.chosen == "stop-and-copy"
    assert "passed over: post-copy 900 ms" in choice.reason
    assert predicted.predicted_ms == 500
    with pytest.raises(OverBudget, match="no strategy fits the 100 ms downtime budget"):
        choose_within_budget("auto", 100, HERE, THERE, lambda s: forecaster(s).model_copy(
            update={"budget_ms": 100}))  # fmt: skip


def test_without_a_budget_auto_keeps_its_preference_and_records_the_forecast() -> None:
    def forecaster(strategy: str) -> FreezeForecast:
        return forecast(
            strategy, memory_bytes=0, memory_basis="unknown", destination="h2", history=(),
            budget_ms=None,
        )  # fmt: skip

    choice, predicted = choose_within_budget("auto", None, HERE, THERE, forecaster)
    assert choice.chosen == "post-copy" and predicted.strategy == "post-copy"
    assert predicted.budget_ms is None and predicted.fits
