"""Ferry's metrics: each helper records what it says (names, attributes, values), an ended
saga counts once, the gauges read the bus off its loop, and the JSON-lines file stays
parseable and bounded."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData

from schemas.v2.migrations import MigrationRecord
from schemas.v2.results import (
    DumpResult,
    OpenNetworkResult,
    PreflightResult,
    RestoreResult,
    StepResult,
    TransferResult,
    VerifyResult,
)
from services import metrics
from services.cleanup.collector import Collector, PlacementSeen
from services.errors import InvalidInput
from services.metrics_file import JsonLinesMetricExporter
from services.runtime.runc import RuncState
from tests.support import records
from tests.support.otlp import Receiver
from tests.support.saga import new_record, only, run_until
from workflows.fencing import Answer, Record, Rules, Where
from workflows.saga import Decision, begin, step_succeeded
from workflows.stop_and_copy import STOP_AND_COPY

SOURCE_FROZE_AT = 100.0  # the source's clock
SKEW_S = 1000.0  # the destination's clock runs this far ahead: no metric may notice


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[InMemoryMetricReader]:
    """Metrics set up for this test only, read in memory."""
    monkeypatch.setattr(metrics, "_provider", None)
    monkeypatch.setattr(metrics, "_instruments", None)
    memory = InMemoryMetricReader()
    provider = metrics.setup_metrics("ferry-test", "h1", tmp_path, readers=[memory])
    yield memory
    provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, data point) of every point of metric `name`."""
    data = reader.get_metrics_data()
    found = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], Any]:
    return {tuple(sorted(a.items())): p.value for a, p in points(reader, name)}


# when each step ends, on the clock of the host that ran it (h1 source, h2 destination)
FINISHED_AT = {
    "preflight": 90.0,
    "prepare_destination": 91.0 + SKEW_S,
    "presync_files": 95.0,
    "dump": 100.3,
    "transfer": 100.5,
    "restore": 1101.0,
    "verify": 1101.05,
    "commit": 1101.1,
    "open_network": 1101.2,
    "clean_source": 102.0,
}
RESULTS: dict[str, StepResult] = {
    "preflight": PreflightResult(source_pid=42),
    "dump": DumpResult(frozen_at=SOURCE_FROZE_AT, dump_ms=300),
    "transfer": TransferResult(transfer_bytes=10, transfer_ms=150, transfer_sha256="0" * 64),
    "restore": RestoreResult(running_at=1101.0, freeze_ms=1001000, criu_restore_us=40_000),
    "verify": VerifyResult(restored_pid=7),
    "open_network": OpenNetworkResult(frozen_to_open_ms=1001200),
}


def completed_run() -> list[Decision]:
    """Every decision of a stop-and-copy that succeeds, with what its hosts measured."""
    decisions = [begin(STOP_AND_COPY, new_record(), now=80.0)]
    while decisions[-1].commands:
        command = only(decisions[-1])
        result = RESULTS.get(command.step)
        now = FINISHED_AT[command.step]
        decisions.append(step_succeeded(STOP_AND_COPY, decisions[-1].record, command, result, now))
    return decisions


def test_an_ended_migration_counts_its_outcome_and_records_freeze_and_window(
    reader: InMemoryMetricReader,
) -> None:
    record = completed_run()[-1].record
    assert record.state == "completed"
    metrics.migration_ended(record)
    counted = values(reader, metrics.OUTCOMES)
    assert counted == {(("outcome", "completed"), ("strategy", "stop-and-copy")): 1}
    [(attrs, freeze)] = points(reader, metrics.FREEZE)
    assert attrs == {"strategy": "stop-and-copy"}
    assert (freeze.count, freeze.sum) == (1, 300)
    [(attrs, window)] = points(reader, metrics.UNAVAILABLE)
    assert attrs == {"strategy": "stop-and-copy"}
    # source 100.0 -> 100.5 (500 ms) + CRIU restore 40 ms + destination 1101.0 -> 1101.2
    # (200 ms); the 1000 s between the two clocks shows up nowhere
    assert window.count == 1
    assert window.sum == pytest.approx(740.0)


def test_an_end_of_saga_counts_once_even_when_its_last_command_comes_again(
    reader: InMemoryMetricReader,
) -> None:
    decisions = completed_run()
    for decision in decisions:
        metrics.saga_decided(decision)  # what the runner does with every transition
    before_end = decisions[-2]
    redelivered = step_succeeded(
        STOP_AND_COPY, decisions[-1].record, only(before_end), None, now=103.0
    )
    assert redelivered.finished and not redelivered.changed
    metrics.saga_decided(redelivered)
    assert values(reader, metrics.OUTCOMES) == {
        (("outcome", "completed"), ("strategy", "stop-and-copy")): 1
    }
    [(_, freeze)] = points(reader, metrics.FREEZE)
    assert freeze.count == 1


def test_a_rollback_after_the_freeze_has_a_freeze_but_no_window(
    reader: InMemoryMetricReader,
) -> None:
    running = run_until("restore").record
    dumped = running.results.with_result("dump", RESULTS["dump"])
    record = running.model_copy(update={"state": "rolled_back", "results": dumped})
    metrics.migration_ended(record)
    assert values(reader, metrics.OUTCOMES) == {
        (("outcome", "rolled_back"), ("strategy", "stop-and-copy")): 1
    }
    assert [p.sum for _, p in points(reader, metrics.FREEZE)] == [300]
    assert points(reader, metrics.UNAVAILABLE) == []
    assert metrics.unavailable_window_ms(record) is None


def test_a_running_migration_is_not_an_outcome(reader: InMemoryMetricReader) -> None:
    metrics.migration_ended(run_until("transfer").record)
    assert points(reader, metrics.OUTCOMES) == []


def test_the_window_needs_each_piece_from_the_host_that_measured_it() -> None:
    record = completed_run()[-1].record
    steps = tuple(
        s.model_copy(update={"host": "h3"}) if s.name == "transfer" else s for s in record.steps
    )
    moved: MigrationRecord = record.model_copy(update={"steps": steps})
    assert metrics.unavailable_window_ms(moved) is None  # not the source's clock: not used


def test_lease_expiries_and_mass_orphaning_count_by_their_attributes(
    reader: InMemoryMetricReader,
) -> None:
    metrics.lease_expired("restore")
    metrics.lease_expired("restore")
    metrics.lease_expired("dump")
    metrics.mass_orphaning("h1")
    assert values(reader, metrics.LEASE_EXPIRIES) == {
        (("step", "restore"),): 2,
        (("step", "dump"),): 1,
    }
    assert values(reader, metrics.MASS_ORPHANING) == {(("host", "h1"),): 1}


def test_frozen_orphans_is_the_last_sweeps_count(reader: InMemoryMetricReader) -> None:
    assert points(reader, metrics.FROZEN_ORPHANS) == []  # no sweep yet: nothing said
    metrics.frozen_orphans("h1", 3)
    metrics.frozen_orphans("h1", 1)
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 1}


@dataclass
class HostDirs:
    """The part of a host's configuration the collector reads."""

    state_dir: Path
    host: str = "h1"

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / "containers"

    @property
    def netns_dir(self) -> Path:
        return self.state_dir / "netns"


@dataclass
class FakeContainers:
    """Containers that only keep a runc status and a directory each."""

    config: HostDirs
    status: dict[str, str] = field(default_factory=dict)

    @property
    def runc(self) -> FakeContainers:
        return self

    async def list(self) -> list[RuncState]:
        return [RuncState(name=n, status=s, pid=1) for n, s in self.status.items()]

    async def pause(self, name: str) -> None:
        self.status[name] = "paused"

    async def resume(self, name: str) -> None:
        self.status[name] = "running"

    def run(self, name: str) -> None:
        (self.config.containers_dir / name).mkdir(parents=True)
        self.status[name] = "running"


@dataclass
class SilentFleet:
    """Every container placed where the test says; every owner silent."""

    owners: dict[str, str] = field(default_factory=dict)

    async def placement(self, name: str) -> PlacementSeen:
        host = self.owners[name]
        where = Where.HERE if host == "h1" else Where.ELSEWHERE
        return PlacementSeen(where, records.placement(name, host), 1)

    async def migration(self, migration_id: str) -> Record:
        return Record.MISSING

    async def ask(self, host: str, name: str) -> Answer:
        return Answer.SILENT


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def collector(tmp_path: Path, fleet: SilentFleet, clock: Clock) -> tuple[Collector, FakeContainers]:
    containers = FakeContainers(HostDirs(tmp_path))
    rules = Rules(confirm_after_s=10.0, min_age_s=30.0, orphan_limit=2)
    return Collector(cast(Any, containers), fleet, cast(Any, None), rules, clock=clock), containers


async def test_the_collector_reports_the_copies_it_holds_frozen(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    fleet, clock = SilentFleet({"web": "h2"}), Clock()
    c, containers = collector(tmp_path, fleet, clock)
    containers.run("web")
    await c.sweep()
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 0}
    clock.now = 11.0
    assert (await c.sweep()).frozen == ["web"]
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 1}
    clock.now = 30.0
    await c.sweep()  # still frozen: still counted, not counted twice
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 1}
    fleet.owners["web"] = "h1"
    clock.now = 31.0
    assert (await c.sweep()).thawed == ["web"]
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 0}
    assert values(reader, metrics.MASS_ORPHANING) == {}


async def test_the_collector_counts_each_sweep_that_saw_mass_orphaning(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    fleet, clock = SilentFleet({n: "h2" for n in ("a", "b", "c")}), Clock()
    c, containers = collector(tmp_path, fleet, clock)
    for name in fleet.owners:
        containers.run(name)
    await c.sweep()
    for sweep in (1, 2):
        clock.now = 11.0 * sweep
        assert (await c.sweep()).mass_orphaning is not None
    assert values(reader, metrics.MASS_ORPHANING) == {(("host", "h1"),): 2}
    assert values(reader, metrics.FROZEN_ORPHANS) == {(("host", "h1"),): 0}  # none frozen


class FakeSubscription:
    """A pull subscription whose consumer info says what the test wants."""

    def __init__(self, pending: int, ack_pending: int, *, fails: bool = False) -> None:
        self.pending, self.ack_pending, self.fails = pending, ack_pending, fails

    async def consumer_info(self) -> SimpleNamespace:
        if self.fails:
            raise ConnectionError("no responders")
        return SimpleNamespace(num_pending=self.pending, num_ack_pending=self.ack_pending)


async def test_pending_commands_are_read_from_the_consumer_off_its_loop(
    reader: InMemoryMetricReader,
) -> None:
    metrics.watch_commands(FakeSubscription(3, 2), "h1", "source")
    metrics.watch_commands(FakeSubscription(9, 9, fails=True), "h1", "destination")
    # The SDK collects on its export thread while the worker's loop runs.
    seen = await asyncio.to_thread(values, reader, metrics.PENDING)
    assert seen == {(("host", "h1"), ("role", "source")): 5}  # no answer: no point, not 0


async def test_pending_commands_collected_on_the_loop_itself_do_not_wait(
    reader: InMemoryMetricReader,
) -> None:
    metrics.watch_commands(FakeSubscription(3, 2), "h1", "source")
    assert values(reader, metrics.PENDING) == {}  # would deadlock if it waited for the loop


def test_helpers_do_nothing_before_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_instruments", None)
    metrics.migration_ended(completed_run()[-1].record)
    metrics.lease_expired("dump")
    metrics.frozen_orphans("h1", 2)
    metrics.mass_orphaning("h1")


def test_the_export_interval_comes_from_the_environment() -> None:
    assert metrics.export_interval_s({}) == metrics.DEFAULT_INTERVAL_S == 15.0
    assert metrics.export_interval_s({"FERRY_METRICS_INTERVAL_S": "2.5"}) == 2.5
    for bad in ("soon", "0", "-1", "nan"):
        with pytest.raises(InvalidInput) as caught:
            metrics.export_interval_s({"FERRY_METRICS_INTERVAL_S": bad})
        assert caught.value.field == "FERRY_METRICS_INTERVAL_S"


@pytest.mark.parametrize("variable", metrics.OTLP_ENDPOINT_ENVS)
def test_an_otlp_endpoint_in_the_environment_sends_them_there(
    variable: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(metrics, "_provider", None)
    monkeypatch.setattr(metrics, "_instruments", None)
    for name in metrics.OTLP_ENDPOINT_ENVS:
        monkeypatch.delenv(name, raising=False)
    with Receiver() as receiver:
        base = f"http://127.0.0.1:{receiver.port}"
        url = f"{base}/v1/metrics" if variable.endswith("METRICS_ENDPOINT") else base
        monkeypatch.setenv(variable, url)
        provider = metrics.setup_metrics("ferry-source", "h1", tmp_path)
        try:
            metrics.lease_expired("dump")
            assert provider.force_flush(5000)
        finally:
            provider.shutdown()
        assert metrics.LEASE_EXPIRIES in receiver.received.metrics
    assert not (tmp_path / "log").exists()  # not both


def test_without_a_collector_metrics_go_to_the_state_dirs_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(metrics, "_provider", None)
    monkeypatch.setattr(metrics, "_instruments", None)
    provider = metrics.setup_metrics(
        "ferry-cleanup", "h1", tmp_path, env={"FERRY_METRICS_INTERVAL_S": "3600"}
    )
    try:
        metrics.lease_expired("verify")
        assert provider.force_flush(5000)
    finally:
        provider.shutdown()
    lines = (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()
    assert lines
    document = json.loads(lines[0])
    [resource] = document["resource_metrics"]
    assert resource["resource"]["attributes"]["service.name"] == "ferry-cleanup"
    assert resource["resource"]["attributes"]["host.name"] == "h1"
    names = {m["name"] for sm in resource["scope_metrics"] for m in sm["metrics"]}
    assert metrics.LEASE_EXPIRIES in names


def collected(reader: InMemoryMetricReader) -> MetricsData:
    data = reader.get_metrics_data()
    assert data is not None
    return data


def test_the_json_lines_file_stays_parseable_and_bounded(
    reader: InMemoryMetricReader, tmp_path: Path
) -> None:
    path = tmp_path / "log" / "metrics.jsonl"
    exporter = JsonLinesMetricExporter(path, max_bytes=4096)
    for i in range(60):
        metrics.lease_expired(f"step{i % 7}")
        exporter.export(collected(reader))
    rotated = path.with_name("metrics.jsonl.1")
    assert rotated.exists()
    for kept in (path, rotated):
        assert 0 < kept.stat().st_size <= 4096
        for line in kept.read_text().splitlines():
            assert json.loads(line)["exported_at_ns"] > 0
    last = json.loads(path.read_text().splitlines()[-1])
    [resource] = last["resource_metrics"]
    [expiries] = [
        m for sm in resource["scope_metrics"] for m in sm["metrics"]
        if m["name"] == metrics.LEASE_EXPIRIES
    ]  # fmt: skip
    assert sum(p["value"] for p in expiries["data"]["data_points"]) == 60


def test_nothing_measured_writes_no_line(reader: InMemoryMetricReader, tmp_path: Path) -> None:
    assert reader.get_metrics_data() is None  # the SDK's periodic reader exports nothing then
    path = tmp_path / "metrics.jsonl"
    JsonLinesMetricExporter(path).export(MetricsData(resource_metrics=[]))
    assert not path.exists()
