"""After a lost store: placements and migration endings judged from the hosts' ledgers."""

from __future__ import annotations

from schemas.v1.containers import Placement, RuntimeContainer
from schemas.v2.ledger import LedgerMigration, LedgerReport
from schemas.v2.migrations import MigrationRecord
from tests.support.records import migration_record, placement, running_at
from workflows import reconcile

NOW = 1000.0


def report(
    host: str,
    *,
    held: tuple[Placement, ...] = (),
    runs: tuple[str, ...] = (),
    migrations: tuple[LedgerMigration, ...] = (),
    stopped: tuple[str, ...] = (),
) -> LedgerReport:
    runtime = [RuntimeContainer(name=n, state="running", pid=1) for n in runs]
    runtime += [RuntimeContainer(name=n, state="stopped") for n in stopped]
    return LedgerReport(host=host, containers=held, migrations=migrations, runtime=tuple(runtime))


def took_part(
    record: MigrationRecord, role: str, *, committed: bool = False, source_done: bool = False
) -> LedgerMigration:
    return LedgerMigration.model_validate(
        {
            "id": record.id,
            "container": record.container,
            "role": role,
            "record": record.model_dump(),
            "committed": committed,
            "source_done": source_done,
            "updated_at": 1.0,
        }
    )


def plan(
    *reports: LedgerReport, records: tuple[MigrationRecord, ...] = (), **kwargs: object
) -> reconcile.Plan:
    """`records`: what the migrations bucket still holds."""
    return reconcile.plan(
        reports,
        kwargs.get("silent", {}),  # type: ignore[arg-type]
        kwargs.get("on_bus", {}),  # type: ignore[arg-type]
        {r.id: r for r in records},
        NOW,
    )


def actions(result: reconcile.Plan) -> list[tuple[str, str, str, str | None]]:
    return [
        (p.action, p.placement.name, p.placement.host, p.placement.migration_id)
        for p in result.placements
    ]


def test_a_container_running_on_one_host_is_placed_there() -> None:
    result = plan(
        report("h1", held=(placement("web", "h1"),), runs=("web",)),
        report("h2", held=(placement("db", "h2", ip="10.77.0.11"),), runs=("db",)),
    )
    assert actions(result) == [("create", "db", "h2", None), ("create", "web", "h1", None)]
    assert result.conflicts == [] and result.blocked is None
    assert result.placements[0].placement.ip == "10.77.0.11"


def test_runc_is_the_truth_the_ledger_gives_the_spec() -> None:
    # h1's ledger still lists web (say it was moved by hand); runc says it runs on h2.
    result = plan(report("h1", held=(placement("web", "h1"),)), report("h2", runs=("web",)))
    assert actions(result) == [("create", "web", "h2", None)]


def test_two_copies_without_a_committed_migration_are_a_conflict() -> None:
    result = plan(
        report("h1", held=(placement(),), runs=("web",)),
        report("h2", held=(placement("web", "h2"),), runs=("web",)),
    )
    assert result.placements == []
    assert [c.name for c in result.conflicts] == ["web"]


def test_two_copies_go_to_the_destination_a_committed_migration_names() -> None:
    done = migration_record(state="completed", committed=True)
    result = plan(
        report("h1", runs=("web",), migrations=(took_part(done, "source"),)),
        report(
            "h2",
            held=(placement("web", "h2"),),
            runs=("web",),
            migrations=(took_part(done, "destination", committed=True),),
        ),
    )
    assert actions(result) == [("create", "web", "h2", None)]
    assert [m.action for m in result.migrations] == ["ended"]


def test_not_committed_anywhere_rolls_back_to_the_source() -> None:
    record = running_at("restore", since=1.0)
    result = plan(
        report("h1", held=(placement(),), migrations=(took_part(record, "source"),)),
        report("h2", runs=("web",), migrations=(took_part(record, "destination"),)),
    )
    [migration] = result.migrations
    assert migration.action == "roll_back" and migration.decision is not None
    assert migration.decision.record.state == "compensating"
    assert all(c.kind == "compensation" for c in migration.decision.commands)
    assert actions(result) == [("create", "web", "h1", record.id)]
    assert result.placements[0].placement.state == "migrating"


def test_committed_on_the_destination_rolls_forward() -> None:
    record = running_at("commit", since=1.0)
    result = plan(
        report("h1", held=(placement(),), runs=("web",), migrations=(took_part(record, "source"),)),
        report(
            "h2",
            held=(placement("web", "h2"),),
            runs=("web",),
            migrations=(took_part(record, "destination", committed=True),),
        ),
    )
    [migration] = result.migrations
    assert migration.action == "roll_forward" and migration.decision is not None
    assert migration.decision.record.committed
    assert [c.step for c in migration.decision.commands] == ["open_network"]
    assert actions(result) == [("create", "web", "h2", record.id)]


def test_the_newest_copy_of_a_record_decides() -> None:
    older, newer = running_at("verify", since=5.0), running_at("commit", since=1.0)
    assert reconcile.newest(older, newer) is newer
    assert reconcile.newest(newer, older) is newer
    result = plan(
        report("h1", held=(placement(),), migrations=(took_part(older, "source"),)),
        report("h2", migrations=(took_part(newer, "destination", committed=True),)),
    )
    assert result.migrations[0].action == "roll_forward"


def test_a_silent_host_blocks_every_write() -> None:
    result = plan(report("h1", held=(placement(),), runs=("web",)), silent={"h2": "no answer"})
    assert result.blocked is not None and "h2" in result.blocked
    assert result.as_json()["blocked"] == result.blocked


def test_a_placement_on_the_bus_is_never_overwritten() -> None:
    same = plan(report("h1", held=(placement(),), runs=("web",)), on_bus={"web": placement()})
    assert actions(same) == [("exists", "web", "h1", None)]
    other = plan(
        report("h1", held=(placement(),), runs=("web",)), on_bus={"web": placement("web", "h2")}
    )
    assert actions(other) == [("differs", "web", "h1", None)]


def test_a_migration_whose_record_is_on_the_bus_is_left_to_the_saga() -> None:
    record = running_at("restore", since=1.0)
    result = plan(
        report("h1", held=(placement(),), runs=("web",), migrations=(took_part(record, "source"),)),
        records=(record,),
    )
    assert [m.action for m in result.migrations] == ["on_bus"]
    assert actions(result) == [("create", "web", "h1", record.id)], "still locked by it"
    finished = migration_record(state="completed", committed=True)
    result = plan(
        report("h1", migrations=(took_part(finished, "source", source_done=True),)),
        report("h2", held=(placement("web", "h2"),), runs=("web",)),
        records=(finished,),
    )
    assert [m.action for m in result.migrations] == ["ended"]
    assert actions(result) == [("create", "web", "h2", None)]


def test_what_runs_nowhere_or_has_no_spec_is_reported_not_written() -> None:
    result = plan(report("h1", held=(placement(),), stopped=("web",)), report("h2", runs=("db",)))
    assert result.placements == []
    assert sorted(c.name for c in result.conflicts) == ["db", "web"]


def test_no_roll_forward_onto_a_destination_that_does_not_run_it() -> None:
    record = running_at("commit", since=1.0)
    result = plan(
        report("h1", held=(placement(),), runs=("web",), migrations=(took_part(record, "source"),)),
        report("h2", migrations=(took_part(record, "destination", committed=True),)),
    )
    assert result.placements == []
    assert [c.name for c in result.conflicts] == ["web"]
    assert "does not run it" in result.conflicts[0].reason


def dumped_on_h1(record: MigrationRecord, *older: LedgerMigration) -> LedgerReport:
    """The source after its dump: its ledger holds the container, runc no longer lists it."""
    return report("h1", held=(placement(),), migrations=(*older, took_part(record, "source")))


def test_a_live_move_is_placed_though_an_older_one_looks_unfinished_in_the_ledgers() -> None:
    # Only the placement bucket was lost, at the transfer of web's move h1 -> h2. An earlier
    # move h2 -> h1 ended, but the ledgers' copies of its record stop before the end (no
    # worker of either host wrote the last one down); its id sorts first.
    earlier = running_at(
        "open_network", since=1.0, migration_id="0000000000000001", source="h2", destination="h1"
    )
    ended = earlier.model_copy(update={"state": "completed"})
    live = running_at("transfer", since=2.0, migration_id="ffffffffffffffff")
    h1 = dumped_on_h1(live, took_part(earlier, "destination", committed=True))
    h2 = report("h2", migrations=(took_part(earlier, "source"), took_part(live, "destination")))
    result = plan(h1, h2, records=(ended, live))
    assert result.conflicts == []
    assert actions(result) == [("create", "web", "h1", live.id)], "on the source, locked by it"
    assert result.placements[0].placement.state == "migrating"
    assert {m.record.id: m.action for m in result.migrations} == {
        earlier.id: "ended", live.id: "on_bus",
    }  # fmt: skip


def test_the_bus_record_says_whether_a_live_migration_committed() -> None:
    # The commit's record write reached the bus; the destination's ledger never heard.
    live = running_at("open_network", since=2.0)
    h2 = report("h2", runs=("web",), migrations=(took_part(live, "destination"),))
    result = plan(report("h1", held=(placement(),)), h2, records=(live,))
    assert actions(result) == [("create", "web", "h2", live.id)]


def test_a_live_record_no_ledger_mentions_still_locks_its_container() -> None:
    live = running_at("preflight", since=2.0)
    result = plan(report("h1", held=(placement(),), runs=("web",)), records=(live,))
    assert actions(result) == [("create", "web", "h1", live.id)]


def test_an_older_migration_only_a_ledger_kept_is_over_once_a_newer_one_is_live() -> None:
    # Its record is gone from the bus, its copies look unfinished: ending it would
    # compensate a move that is long over (discarding h1's copy: the live move's source).
    older = running_at(
        "restore", since=1.0, migration_id="0000000000000001", source="h2", destination="h1"
    )
    live = running_at("transfer", since=2.0, migration_id="ffffffffffffffff")
    h1 = dumped_on_h1(live, took_part(older, "destination"))
    result = plan(h1, report("h2", migrations=(took_part(older, "source"),)), records=(live,))
    assert actions(result) == [("create", "web", "h1", live.id)]
    by_id = {m.record.id: m for m in result.migrations}
    assert by_id[older.id].action == "ended" and by_id[older.id].decision is None


def test_two_live_migrations_of_one_container_write_nothing_for_it() -> None:
    one = running_at("transfer", since=2.0, migration_id="0000000000000001")
    two = running_at("restore", since=3.0, migration_id="ffffffffffffffff")
    result = plan(dumped_on_h1(one, took_part(two, "source")), records=(one, two))
    assert result.placements == []
    assert [c.name for c in result.conflicts] == ["web"]
