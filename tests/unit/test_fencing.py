"""Fencing decides from evidence only: a copy goes only when another host is named twice and
confirms it runs the container; anything unknown keeps, freezes at most, and alerts."""

from __future__ import annotations

import itertools
from dataclasses import replace

from workflows.fencing import (
    Action,
    Answer,
    DirAction,
    Lock,
    Record,
    Rules,
    Sighting,
    Track,
    Where,
    decide,
    decide_dir,
    limit,
    observe,
    observe_dir,
    remember,
)

RULES = Rules(confirm_after_s=10.0, min_age_s=30.0, orphan_limit=3)


def sweeps(seen: Sighting, times: list[float]) -> tuple[Track | None, list[Action]]:
    """Observe and decide the same sighting at each time; the track and the actions."""
    track: Track | None = None
    actions = []
    for now in times:
        track = observe(track, seen, now)
        actions.append(decide(seen, track, now, RULES).action)
    return track, actions


ELSEWHERE = Sighting("web", Where.ELSEWHERE, owner="h2", revision=7)


def test_a_copy_placed_elsewhere_is_suspected_then_its_owner_is_asked() -> None:
    _, actions = sweeps(ELSEWHERE, [0.0, 5.0, 12.0])
    # First sighting, then too soon (5 s < 10 s), then two sightings 12 s apart.
    assert actions == [Action.SUSPECT, Action.SUSPECT, Action.ASK_OWNER]


def test_two_sightings_far_apart_are_enough_but_one_is_never() -> None:
    _, actions = sweeps(ELSEWHERE, [0.0, 100.0])
    assert actions == [Action.SUSPECT, Action.ASK_OWNER]
    track = observe(None, ELSEWHERE, 0.0)
    assert decide(replace(ELSEWHERE, answer=Answer.RUNS), track, 1000.0, RULES).action is (
        Action.SUSPECT
    )


def test_the_owners_answer_decides() -> None:
    track, _ = sweeps(ELSEWHERE, [0.0, 20.0])
    expected = {
        (Answer.RUNS, False): Action.DISCARD,
        (Answer.RUNS, True): Action.DISCARD,  # the discard rule holds: a frozen copy goes too
        (Answer.SILENT, False): Action.FREEZE,
        (Answer.SILENT, True): Action.KEEP,  # already frozen: stays so
        (Answer.NOT_RUNNING, False): Action.KEEP,  # maybe the only copy
        (Answer.NOT_RUNNING, True): Action.THAW,
        (Answer.PAUSED, False): Action.KEEP,
        (Answer.PAUSED, True): Action.KEEP,
    }
    for (answer, frozen), action in expected.items():
        seen = replace(ELSEWHERE, answer=answer, frozen=frozen)
        decision = decide(seen, track, 20.0, RULES)
        assert decision.action is action, (answer, frozen, decision)
    for answer in (Answer.SILENT, Answer.NOT_RUNNING):
        assert decide(replace(ELSEWHERE, answer=answer), track, 20.0, RULES).alert


def test_a_new_revision_starts_the_confirmation_again() -> None:
    track = observe(None, ELSEWHERE, 0.0)
    moved = replace(ELSEWHERE, revision=8)
    track = observe(track, moved, 20.0)
    assert track is not None and track.sweeps == 1 and track.since == 20.0
    assert decide(moved, track, 20.0, RULES).action is Action.SUSPECT


def test_another_owner_starts_it_again_too() -> None:
    track = observe(None, ELSEWHERE, 0.0)
    other = replace(ELSEWHERE, owner="h3")
    assert decide(other, observe(track, other, 20.0), 20.0, RULES).action is Action.SUSPECT


def test_an_unavailable_placement_keeps_and_neither_confirms_nor_refutes() -> None:
    track = observe(None, ELSEWHERE, 0.0)
    gone = Sighting("web", Where.UNAVAILABLE)
    assert observe(track, gone, 5.0) == track
    assert decide(gone, track, 5.0, RULES).action is Action.KEEP
    assert decide(replace(gone, frozen=True), track, 5.0, RULES).action is Action.KEEP
    track = observe(track, ELSEWHERE, 20.0)
    assert decide(ELSEWHERE, track, 20.0, RULES).action is Action.ASK_OWNER


def test_an_absent_placement_is_never_destroyed_only_alerted_once_old() -> None:
    absent = Sighting("web", Where.ABSENT)
    times = [float(t) for t in range(0, 600, 5)]
    _, actions = sweeps(absent, times)
    assert set(actions) == {Action.SUSPECT, Action.ALERT_UNPLACED}
    assert actions[:6] == [Action.SUSPECT] * 6  # younger than min_age_s
    assert actions[-1] is Action.ALERT_UNPLACED
    _, frozen = sweeps(replace(absent, frozen=True), times)
    assert Action.THAW not in frozen and Action.DISCARD not in frozen


def test_placed_here_it_runs_and_a_copy_this_host_froze_is_thawed() -> None:
    here = Sighting("web", Where.HERE, owner="h1", revision=3)
    _, actions = sweeps(here, [0.0, 20.0])
    assert actions == [Action.RELEASE_HOLDS] * 2
    thaw = decide(replace(here, frozen=True), None, 0.0, RULES)
    assert thaw.action is Action.THAW and thaw.alert


def test_a_live_or_unknown_migration_keeps_everything() -> None:
    for where, lock, frozen in itertools.product(
        (Where.HERE, Where.ELSEWHERE), (Lock.LIVE, Lock.UNAVAILABLE), (False, True)
    ):
        seen = Sighting("web", where, owner="h2", revision=1, lock=lock, frozen=frozen)
        track, actions = sweeps(seen, [0.0, 20.0, 40.0])
        assert actions == [Action.KEEP] * 3
        assert decide(replace(seen, answer=Answer.RUNS), track, 40.0, RULES).action is Action.KEEP


def test_a_lock_of_an_ended_or_missing_migration_is_released_on_the_second_sighting() -> None:
    for lock in (Lock.ENDED, Lock.MISSING):
        seen = Sighting("web", Where.HERE, owner="h1", revision=4, lock=lock)
        _, actions = sweeps(seen, [0.0, 5.0, 11.0])
        assert actions == [Action.SUSPECT, Action.SUSPECT, Action.RELEASE_LOCK]


def test_a_lock_with_no_record_elsewhere_is_left_to_the_owner() -> None:
    seen = replace(ELSEWHERE, lock=Lock.MISSING)
    track, actions = sweeps(seen, [0.0, 20.0])
    assert actions == [Action.KEEP] * 2
    assert decide(replace(seen, answer=Answer.RUNS), track, 20.0, RULES).action is Action.KEEP
    ended = replace(ELSEWHERE, lock=Lock.ENDED)
    _, actions = sweeps(ended, [0.0, 20.0])
    assert actions[-1] is Action.ASK_OWNER  # an ended lock is no excuse to keep a copy


def test_nothing_is_discarded_without_every_piece_of_evidence() -> None:
    """Exhaustively: DISCARD only for another host named twice, far apart, that runs it."""
    for where, lock, frozen, answer, times in itertools.product(
        Where,
        Lock,
        (False, True),
        (*Answer, None),
        ([0.0], [0.0, 5.0], [0.0, 20.0]),
    ):
        seen = Sighting("web", where, owner="h2", revision=1, lock=lock, frozen=frozen)
        track = None
        for now in times:
            track = observe(track, seen, now)
        decision = decide(replace(seen, answer=answer), track, times[-1], RULES)
        if decision.action is Action.DISCARD:
            assert where is Where.ELSEWHERE and answer is Answer.RUNS
            assert lock in (Lock.NONE, Lock.ENDED) and times == [0.0, 20.0]
        if decision.action is Action.FREEZE:
            assert where is Where.ELSEWHERE and answer is Answer.SILENT and not frozen


def test_more_orphans_than_the_limit_is_a_lost_store_and_nothing_happens() -> None:
    track, _ = sweeps(ELSEWHERE, [0.0, 20.0])

    def discard(name: str) -> Sighting:
        return replace(ELSEWHERE, name=name, answer=Answer.RUNS)

    def freeze(name: str) -> Sighting:
        return replace(ELSEWHERE, name=name, answer=Answer.SILENT)

    three = [decide(s, track, 20.0, RULES) for s in (discard("a"), freeze("b"), discard("c"))]
    plan = limit(three, RULES)
    assert plan.mass_orphaning is None
    assert [d.action for d in plan.decisions] == [Action.DISCARD, Action.FREEZE, Action.DISCARD]

    here = decide(Sighting("d", Where.HERE, owner="h1"), None, 20.0, RULES)
    four = [*three, decide(freeze("e"), track, 20.0, RULES), here]
    plan = limit(four, RULES)
    assert plan.mass_orphaning is not None and "4 containers" in plan.mass_orphaning
    assert [d.action for d in plan.decisions] == [Action.KEEP] * 4 + [Action.RELEASE_HOLDS]
    assert all(d.alert for d in plan.decisions[:4])
    assert plan.of(Action.DISCARD) == [] and plan.of(Action.FREEZE) == []


def test_a_migration_dir_goes_only_when_its_record_ended_seen_twice() -> None:
    def run(record: Record, times: list[float]) -> list[DirAction]:
        track = None
        actions = []
        for now in times:
            track = observe_dir(track, record, now)
            actions.append(decide_dir("m1", record, track, now, RULES).action)
        return actions

    assert run(Record.ENDED, [0.0, 5.0, 11.0]) == [
        DirAction.SUSPECT,
        DirAction.SUSPECT,
        DirAction.REMOVE,
    ]
    assert run(Record.LIVE, [0.0, 20.0]) == [DirAction.KEEP] * 2
    assert run(Record.UNAVAILABLE, [0.0, 20.0, 40.0]) == [DirAction.KEEP] * 3
    missing = run(Record.MISSING, [float(t) for t in range(0, 300, 10)])
    assert DirAction.REMOVE not in missing
    assert missing[0] is DirAction.SUSPECT and missing[-1] is DirAction.ALERT_MISSING


def test_an_unavailable_record_between_two_ended_ones_does_not_reset_them() -> None:
    track = observe_dir(None, Record.ENDED, 0.0)
    assert observe_dir(track, Record.UNAVAILABLE, 5.0) == track
    track = observe_dir(track, Record.ENDED, 11.0)
    assert decide_dir("m1", Record.ENDED, track, 11.0, RULES).action is DirAction.REMOVE


def test_memory_keeps_only_what_this_sweep_saw() -> None:
    a = observe(None, ELSEWHERE, 0.0)
    kept = remember({"web": a, "old": a, "none": None}, ["web", "none"])
    assert kept == {"web": a}
