"""`make chaos`'s verdict: the placement against where the container really runs."""

from __future__ import annotations

from deploy.chaos_checks import Seen, verdict


def seen(**kw: object) -> Seen:
    base = {
        "placement_host": "h2",
        "placement_state": "running",
        "runnable": ["h2"],
        "answering": ["h2"],
        "client_ok": True,
    }
    return Seen(**(base | kw))  # type: ignore[arg-type]


def judge(state: str = "completed", error: str = "", **kw: object) -> tuple[str, list[str]]:
    args: dict[str, object] = {"fired": True, "confirmed_twice": False, "leftovers": []}
    return verdict(state=state, error=error, seen=kw.pop("seen", seen()), **(args | kw))  # type: ignore[arg-type]


def test_one_copy_where_the_placement_says_is_ok() -> None:
    assert judge() == ("ok", [])


def test_no_copy_running_is_lost() -> None:
    assert judge(seen=seen(runnable=[], answering=[], client_ok=False))[0] == "lost"


def test_a_copy_whose_memory_changed_is_lost() -> None:
    assert judge(seen=seen(client_ok=False))[0] == "lost"


def test_two_hosts_running_or_answering_is_two_copies() -> None:
    assert judge(seen=seen(runnable=["h1", "h2"]))[0] == "two-copies"
    assert judge(seen=seen(answering=["h1", "h2"]))[0] == "two-copies"
    assert judge(confirmed_twice=True)[0] == "two-copies"


def test_the_placement_naming_another_host_is_placement_wrong() -> None:
    assert judge(seen=seen(placement_host="h1"))[0] == "placement-wrong"


def test_an_unreadable_placement_is_placement_wrong_and_says_why() -> None:
    name, problems = judge(seen=seen(placement_host="", placement_note="bucket missing"))
    assert name == "placement-wrong"
    assert "bucket missing" in problems[0]


def test_a_placement_still_locked_is_placement_wrong() -> None:
    assert judge(seen=seen(placement_state="migrating"))[0] == "placement-wrong"


def test_a_cell_that_had_to_roll_forward_but_runs_on_the_source_is_fatal() -> None:
    ended = seen(placement_host="h1", runnable=["h1"], answering=["h1"])
    assert judge(seen=ended, must_end_on="h2")[0] == "not-rolled-forward"


def test_failed_needs_a_reason() -> None:
    assert judge(state="failed")[0] == "failed-without-reason"
    assert judge(state="failed", error="resume_source gave up: h1 declared dead")[0] == "failed"


def test_unfinished_outranks_everything_and_every_problem_is_listed() -> None:
    name, problems = judge(state="unfinished", seen=seen(placement_host="h1"), fired=False)
    assert name == "unfinished"
    assert [p.split(":")[0] for p in problems] == ["unfinished", "placement-wrong", "not-fired"]


def test_leftovers_and_a_fault_that_did_not_fire_are_flagged_not_hidden() -> None:
    assert judge(leftovers=["h1:veth"])[0] == "leftovers"
    assert judge(fired=False)[0] == "not-fired"
