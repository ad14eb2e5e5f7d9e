"""Which NATS node the nats-kill fault kills, from the nodes' /jsz reports (pure logic)."""

from __future__ import annotations

from typing import Any

from deploy.chaos_nats import Leaders, agreed, choose, ended_before, step_at

NODES = ("n1", "n2", "n3")


def report(meta: str, commands: str, placement: str, **others: str) -> dict[str, Any]:
    streams = {"FERRY_COMMANDS": commands, "KV_ferry-placement": placement, **others}
    return {
        "meta_cluster": {"leader": meta},
        "account_details": [
            {"stream_detail": [{"name": s, "cluster": {"leader": n}} for s, n in streams.items()]}
        ],
    }


def test_leaders_are_believed_only_when_every_node_says_the_same() -> None:
    one = report("n1", "n2", "n3")
    assert agreed([one, one, one]) == Leaders(
        "n1", {"FERRY_COMMANDS": "n2", "KV_ferry-placement": "n3"}
    )
    assert agreed([one, report("n1", "n1", "n3")]) is None  # a view lagging an election
    assert agreed([report("", "n2", "n3")]) is None  # no meta leader (yet)
    assert agreed([report("n1", "", "n3")]) is None  # a stream without a leader
    assert agreed([]) is None


def test_each_target_names_the_node_that_leads_it() -> None:
    leaders = Leaders("n1", {"FERRY_COMMANDS": "n2", "KV_ferry-placement": "n2", "X": "n3"})
    assert choose("meta-leader", leaders, NODES) == "n1"
    assert choose("commands-leader", leaders, NODES) == "n2"
    assert choose("placement-leader", leaders, NODES) == "n2"
    # A follower leads none of the three; leading another stream does not count.
    assert choose("follower", leaders, NODES) == "n3"
    assert leaders.led_by("n2") == ["FERRY_COMMANDS", "KV_ferry-placement"]
    assert leaders.led_by("n1") == ["meta"]


def test_no_follower_when_each_node_leads_one_of_the_three() -> None:
    leaders = Leaders("n1", {"FERRY_COMMANDS": "n2", "KV_ferry-placement": "n3"})
    assert choose("follower", leaders, NODES) is None


def test_a_kill_after_the_last_step_ended_was_not_mid_migration() -> None:
    steps = [{"status": "done", "started_at": 100.0, "duration_ms": 2000}]
    assert ended_before({"state": "completed", "steps": steps}, 103.0)
    assert not ended_before({"state": "completed", "steps": steps}, 101.0)
    assert not ended_before({"state": "running", "steps": steps}, 103.0)
    running = [{"status": "running", "started_at": 100.0}]
    assert not ended_before({"state": "completed", "steps": running}, 200.0)


def test_the_step_running_at_the_kill_is_read_from_the_events() -> None:
    events = [
        {"migration_id": "m", "type": "step_started", "step": "dump", "at": 10.0},
        {"migration_id": "other", "type": "step_started", "step": "restore", "at": 10.5},
        {"migration_id": "m", "type": "step_finished", "step": "dump", "at": 11.0},
        {"migration_id": "m", "type": "step_started", "step": "transfer", "at": 11.0},
    ]
    assert step_at(events, "m", 10.75) == "dump (0.8 s in)"
    assert step_at(events, "m", 12.0) == "transfer (1.0 s in)"
    assert step_at(events, "m", 9.0) == "no step"
