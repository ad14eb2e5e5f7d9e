"""Which strategy runs: requested ones are checked against both hosts, auto picks and says why."""

from __future__ import annotations

import pytest

from workflows.definitions import DEFINITIONS
from workflows.strategy import HostFeatures, StrategyUnavailable, choose

NO_DIRTY = {"mem_dirty_track": "no soft-dirty memory tracking in this kernel"}
HERE = HostFeatures("h1", ("lazy_pages",), NO_DIRTY)
THERE = HostFeatures("h2", ("lazy_pages",), NO_DIRTY)
BARE = HostFeatures("h3", (), {"lazy_pages": "userfaultfd unavailable", **NO_DIRTY})
FULL = HostFeatures("h4", ("lazy_pages", "mem_dirty_track"), {})


def test_auto_on_this_kind_of_host_picks_post_copy_and_says_why_not_pre_copy() -> None:
    choice = choose("auto", 300, HERE, THERE)
    assert choice.chosen == "post-copy"
    assert "pre-copy needs mem_dirty_track on h1: no soft-dirty" in choice.reason
    assert "300 ms" in choice.reason


def test_auto_prefers_pre_copy_where_both_hosts_track_dirty_pages() -> None:
    assert choose("auto", 120, FULL, FULL).chosen == "pre-copy"
    # One host without it is enough to rule it out.
    assert choose("auto", 120, FULL, THERE).chosen == "post-copy"


def test_auto_falls_back_to_stop_and_copy_without_lazy_pages_on_either_host() -> None:
    choice = choose("auto", 300, HERE, BARE)
    assert choice.chosen == "stop-and-copy"
    assert "post-copy needs lazy_pages on h3: userfaultfd unavailable" in choice.reason


def test_an_explicit_strategy_the_hosts_cannot_run_is_refused_with_the_reason() -> None:
    with pytest.raises(StrategyUnavailable, match="pre-copy needs mem_dirty_track on h1"):
        choose("pre-copy", 300, HERE, THERE)
    with pytest.raises(StrategyUnavailable, match="lazy_pages on h3"):
        choose("post-copy", 300, BARE, THERE)
    assert choose("stop-and-copy", 300, BARE, BARE).reason == "requested"


def test_every_strategy_auto_can_choose_has_a_saga() -> None:
    for strategy in ("stop-and-copy", "post-copy", "pre-copy"):
        definition = DEFINITIONS[strategy]
        names = [s.name for s in definition.steps]
        # Files go ahead of the freeze; the commit comes after a verified restore.
        assert names.index("dump") < names.index("restore") < names.index("commit")
        assert names.index("verify") == names.index("commit") - 1
    assert "drain_pages" in [s.name for s in DEFINITIONS["post-copy"].steps]
    post = [s.name for s in DEFINITIONS["post-copy"].steps]
    # Pages drain after the commit, and the stopped source goes only after that.
    assert post.index("commit") < post.index("drain_pages") < post.index("clean_source")
    pre = [s.name for s in DEFINITIONS["pre-copy"].steps]
    assert pre.index("precopy_rounds") == pre.index("dump") - 1
