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


def plan(*reports: LedgerReport, **kwargs: object) -> reconcile.Plan:
    return reconcile.plan(
        reports,
        kwargs.get("silent", {}),  # type: ignore[arg-type]
        kwargs.get("on_bus", {}),  # type: ignore[arg-type]
        kwargs.get("records", ()),  # type: ignore[arg-type]
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
        records=(record.id,),
    )
    assert [m.action for m in result.migrations] == ["on_bus"]
    assert actions(result) == [("create", "web", "h1", record.id)], "still locked by it"
    finished = migration_record(state="completed", committed=True)
    result = plan(
        report("h1", migrations=(took_part(finished, "source", source_done=True),)),
        report("h2", held=(placement("web", "h2"),), runs=("web",)),
        records=(finished.id,),
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
