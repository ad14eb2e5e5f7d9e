"""The v2 record and command, and the upcaster that keeps records written by v1 readable."""

from __future__ import annotations

import json

import pytest

from schemas.v2.migrations import MigrationRecord, read_command, read_record
from schemas.v2.results import DumpResult, PreflightResult, RestoreResult, StepResults

V1_RECORD = {
    "schema_version": 1,
    "id": "0123456789abcdef",
    "container": "web",
    "source": "h1",
    "destination": "h2",
    "state": "completed",
    "strategy": {"chosen": "post-copy", "reason": "auto: both hosts have userfaultfd"},
    "trace_id": "0" * 32,
    "traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
    "created_at": 100.0,
    "updated_at": 110.0,
    "deadline": 4000.0,
    "committed": True,
    "steps": [
        {"name": n, "role": r, "host": h, "status": "done", "attempts": 1}
        for n, r, h in (
            ("preflight", "source", "h1"),
            ("prepare_destination", "destination", "h2"),
            ("dump", "source", "h1"),
            ("restore", "destination", "h2"),
            ("verify", "destination", "h2"),
            ("clean_source", "cleanup", "h1"),
        )
    ]
    + [{"name": "transfer", "role": "transfer", "host": "h1", "status": "failed", "attempts": 3}],
    # What v1 kept in one bag: the request's options and every step's facts.
    "facts": {
        "downtime_budget_ms": 250,
        "compress": True,
        "bandwidth_limit_bps": 1048576,
        "strategy": "post-copy",
        "listening_ports": "[7000, 7001]",
        "source_pid": 4242,
        "layers_fetched": 1,
        "layers_present": 1,
        "layer_bytes_fetched": 2048,
        "frozen_at": 105.5,
        "dump_ms": 180,
        "lazy_pages": "10.0.0.1:40000",
        "transfer_bytes": 9000,
        "running_at": 106.0,
        "freeze_ms": 500,
        "criu_restore_us": 70000,
        "pages_restored": 12,
        "restored_pid": 77,
        "source_criu_rc": 0,
        "pages_written": 16384,
    },
    "bytes_moved": 123,
    "freeze_ms": 500,
}


def test_a_v1_record_reads_as_v2_with_its_options_and_typed_results() -> None:
    record = read_record(json.dumps(V1_RECORD).encode())
    assert record.schema_version == 2 and record.chosen == "post-copy"
    assert record.options.downtime_budget_ms == 250 and record.options.compress is True
    assert record.options.bandwidth_limit_bps == 1048576
    assert record.results.preflight == PreflightResult(
        listening_ports=(7000, 7001), source_pid=4242
    )
    assert record.results.prepare_destination is not None
    assert record.results.prepare_destination.layer_bytes_fetched == 2048
    assert record.results.prepare_destination.page_server is None
    assert record.results.dump == DumpResult(
        frozen_at=105.5, dump_ms=180, pages_written=16384, lazy_pages="10.0.0.1:40000"
    )
    assert record.results.restore == RestoreResult(
        running_at=106.0, freeze_ms=500, criu_restore_us=70000, pages_restored=12
    )
    assert record.results.verify is not None and record.results.verify.restored_pid == 77
    assert record.results.clean_source is not None
    assert record.results.clean_source.pages_served == 16384
    # A step that did not finish has no result, even where v1 facts carry its names.
    assert record.results.transfer is None
    assert [s.name for s in record.steps][-1] == "transfer"
    assert record.freeze_ms == 500 and record.bytes_moved == 123 and record.committed


def test_a_v2_record_round_trips_and_is_written_as_v2() -> None:
    record = read_record(json.dumps(V1_RECORD).encode())
    again = read_record(record.to_bytes())
    assert again == record
    assert json.loads(record.to_bytes())["schema_version"] == 2
    assert "facts" not in json.loads(record.to_bytes())


@pytest.mark.parametrize("version", [0, 3, "2"])
def test_an_unknown_record_version_is_refused_by_name(version: object) -> None:
    with pytest.raises(ValueError, match="schema_version"):
        read_record(json.dumps({**V1_RECORD, "schema_version": version}).encode())


def test_a_record_never_names_auto_as_its_strategy() -> None:
    raw = {**V1_RECORD, "schema_version": 2, "strategy": {"chosen": "auto", "reason": "x"}}
    raw.pop("facts")
    with pytest.raises(ValueError, match="auto"):
        MigrationRecord.model_validate(raw)


def test_a_v1_command_takes_host_and_role_from_the_subject_it_came_on() -> None:
    v1 = {
        "migration_id": "0123456789abcdef", "step": "dump", "kind": "forward", "attempt": 2,
        "container": "web", "source": "h1", "destination": "h2",
        "facts": {"page_server": "10.0.0.9:1"}, "not_before": 5.0,
    }  # fmt: skip
    command = read_command(json.dumps(v1).encode(), "h1", "source")
    assert (command.host, command.role, command.step, command.attempt) == (
        "h1",
        "source",
        "dump",
        2,
    )
    assert command.not_before == 5.0 and command.schema_version == 2
    assert not hasattr(command, "facts")  # whatever v1 carried, v2 takes from the record
    assert command.msg_id == "0123456789abcdef.forward.dump.2"


def test_a_v2_command_keeps_its_own_host_and_role() -> None:
    v2 = {"schema_version": 2, "migration_id": "ab" * 8, "step": "restore", "attempt": 1,
          "host": "h2", "role": "destination"}  # fmt: skip
    command = read_command(json.dumps(v2).encode(), "h9", "source")
    assert (command.host, command.role) == ("h2", "destination")


def test_a_result_of_the_wrong_type_for_its_step_is_a_bug() -> None:
    with pytest.raises(TypeError, match="dump returns DumpResult"):
        StepResults().with_result("dump", RestoreResult(running_at=1.0, freeze_ms=1))
    with pytest.raises(ValueError, match="no result slot"):
        StepResults().with_result("commit", RestoreResult(running_at=1.0, freeze_ms=1))
