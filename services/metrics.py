"""Ferry's OpenTelemetry metrics: every instrument, and the small functions call sites use.

`setup_metrics` gives the process a MeterProvider. It exports over OTLP/HTTP when the
standard OTel variables name an endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_METRICS_ENDPOINT), else as JSON lines to <state_dir>/log/metrics.jsonl,
every FERRY_METRICS_INTERVAL_S (default 15 s). Before `setup_metrics`, and in processes that
never call it (the CLI, tests), every helper does nothing.

The provider is this module's own, not the global one: services/tracing.py already sets
the global MeterProvider in the workers, and the SDK refuses a second.

Durations come from what one host measured on its own clock, never from a difference of two
hosts' clocks. docs/metrics.md lists each metric and what to alert on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from schemas.v1.migrations import StepRecord
from schemas.v2.migrations import MigrationRecord
from services.errors import InvalidInput, described
from services.metrics_file import JsonLinesMetricExporter
from workflows.saga import Decision

log = logging.getLogger("ferry.metrics")

INTERVAL_ENV = "FERRY_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 15.0
EXPORT_TIMEOUT_S = 10.0
CONSUMER_INFO_TIMEOUT_S = 2.0  # per queue, inside one collection
OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
ENDED = ("completed", "rolled_back", "failed")
# Freezes and windows run from tens of ms (post-copy) to tens of seconds (a big stop-and-copy).
DURATION_BUCKETS_MS = (25, 50, 100, 150, 250, 400, 600, 1000, 1500, 2500, 5000, 10000, 30000)

OUTCOMES = "ferry.migrations.outcomes"
FREEZE = "ferry.migration.freeze.duration"
UNAVAILABLE = "ferry.migration.unavailable.duration"
PENDING = "ferry.commands.pending"
LEASE_EXPIRIES = "ferry.watchdog.lease_expiries"
FROZEN_ORPHANS = "ferry.collector.frozen_orphans"
MASS_ORPHANING = "ferry.collector.mass_orphaning"


# -- what the record says (pure) -----------------------------------------------------------


def freeze_ms(record: MigrationRecord) -> int | None:
    """The source's freeze: from the freeze to the dump done, on the source's clock."""
    dumped = record.results.dump
    return None if dumped is None else dumped.dump_ms


def _last_done(record: MigrationRecord, step: str, host: str) -> StepRecord | None:
    for entry in reversed(record.steps):
        if entry.kind == "forward" and entry.name == step:
            done = entry.status == "done" and entry.host == host
            return entry if done and entry.finished_at is not None else None
    return None


def unavailable_window_ms(record: MigrationRecord) -> float | None:
    """Freeze to network open on the destination, as a lower bound made of what each host
    timed on its own clock: on the source, the freeze to the transfer done; CRIU's own
    restore time; on the destination, the container running to the network open (verify
    and commit between). Missing: the hop to the destination and its restore work around
    CRIU (page server, images, overlay, runc). None unless the network was opened."""
    results = record.results
    dumped, restored = results.dump, results.restore
    transferred = _last_done(record, "transfer", record.source)
    opened = _last_done(record, "open_network", record.destination)
    if dumped is None or restored is None or transferred is None or opened is None:
        return None
    assert transferred.finished_at is not None and opened.finished_at is not None
    on_source = max(0.0, transferred.finished_at - dumped.frozen_at) * 1000
    on_destination = max(0.0, opened.finished_at - restored.running_at) * 1000
    return on_source + restored.criu_restore_us / 1000 + on_destination


# -- the instruments -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Queue:
    """One durable command consumer, read on the event loop that owns its connection."""

    subscription: Any  # nats-py's pull subscription: `await consumer_info()`
    loop: asyncio.AbstractEventLoop

    def pending(self, timeout_s: float) -> int | None:
        """num_pending + num_ack_pending, or None when unknown (never a guessed 0)."""
        loop = self.loop
        if loop.is_closed() or not loop.is_running() or _runs_on(loop):
            return None  # waiting on the loop from its own thread would only time out
        future = asyncio.run_coroutine_threadsafe(self.subscription.consumer_info(), loop)
        try:
            info = future.result(timeout_s)
        except Exception as exc:  # no answer from the bus: no observation
            future.cancel()
            log.debug("consumer info not read: %s", described(exc))
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


def _runs_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@dataclass
class Instruments:
    """Every Ferry instrument, on one meter; gauges read what the call sites last reported."""

    meter: Meter
    queues: dict[tuple[str, str], _Queue] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.meter
        self.outcomes = m.create_counter(
            OUTCOMES,
            unit="{migration}",
            description="Migrations that ended, by outcome (completed, rolled_back, failed)"
            " and strategy; counted once, by the worker whose transition ended the saga",
        )
        self.freeze = m.create_histogram(
            FREEZE,
            unit="ms",
            description="Freeze on the source: from the freeze to the dump done, on the"
            " source's own clock (the dump step's dump_ms)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_MS,
        )
        self.unavailable = m.create_histogram(
            UNAVAILABLE,
            unit="ms",
            description="Freeze to network open on the destination, a lower bound: source"
            " freeze to transfer done (source clock) + CRIU restore time + destination"
            " running to network open (destination clock); the hop between the hosts and"
            " the restore work around CRIU are not included",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_MS,
        )
        self.lease_expiries = m.create_counter(
            LEASE_EXPIRIES,
            unit="{lease}",
            description="Step leases the watchdog found expired (the worker stopped renewing"
            " it) and moved on from, by step",
        )
        self.mass_orphaning = m.create_counter(
            MASS_ORPHANING,
            unit="{alert}",
            description="Collector sweeps that found more would-be orphans than the limit"
            " and did nothing (taken for a lost placement store)",
        )
        m.create_observable_gauge(
            PENDING,
            callbacks=[self._observe_pending],
            unit="{command}",
            description="Commands waiting for or held by a host role's worker: the durable"
            " consumer's num_pending + num_ack_pending",
        )
        m.create_observable_gauge(
            FROZEN_ORPHANS,
            callbacks=[self._observe_frozen],
            unit="{container}",
            description="Containers the collector froze (runc pause) because the host the"
            " placement names did not answer; as of its last sweep",
        )

    def _observe_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        timeout_s = min(CONSUMER_INFO_TIMEOUT_S, options.timeout_millis / 1000)
        for (host, role), queue in list(self.queues.items()):
            pending = queue.pending(timeout_s)
            if pending is not None:
                yield Observation(pending, {"host": host, "role": role})

    def _observe_frozen(self, options: CallbackOptions) -> Iterable[Observation]:
        for host, count in list(self.frozen.items()):
            yield Observation(count, {"host": host})


_instruments: Instruments | None = None
_provider: MeterProvider | None = None


def export_interval_s(env: Mapping[str, str] = os.environ) -> float:
    raw = env.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidInput(
            f"{INTERVAL_ENV} must be a number of seconds", field=INTERVAL_ENV
        ) from exc
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"{INTERVAL_ENV} must be above 0", field=INTERVAL_ENV)
    return value


def metrics_path(state_dir: Path) -> Path:
    return state_dir / "log" / "metrics.jsonl"


def _default_reader(state_dir: Path, env: Mapping[str, str]) -> MetricReader:
    if any(env.get(name, "").strip() for name in OTLP_ENDPOINT_ENVS):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter: Any = OTLPMetricExporter()  # reads the same OTEL_* variables
    else:
        exporter = JsonLinesMetricExporter(metrics_path(state_dir))
    return PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=export_interval_s(env) * 1000,
        export_timeout_millis=EXPORT_TIMEOUT_S * 1000,
    )


def setup_metrics(
    service: str,
    host: str,
    state_dir: Path,
    *,
    readers: Sequence[MetricReader] | None = None,
    env: Mapping[str, str] = os.environ,
) -> MeterProvider:
    """This process's MeterProvider and instruments; a second call replaces the first
    (tests pass their own `readers`)."""
    global _instruments, _provider
    resource = Resource.create(
        {"service.name": service, "host.name": host, "service.namespace": "ferry"}
    )
    chosen = list(readers) if readers is not None else [_default_reader(state_dir, env)]
    provider = MeterProvider(resource=resource, metric_readers=chosen)
    if _provider is not None:
        _provider.shutdown()
    _provider = provider
    _instruments = Instruments(provider.get_meter("ferry"))
    return provider


# -- what call sites use -------------------------------------------------------------------


def migration_ended(record: MigrationRecord) -> None:
    """Outcome, freeze and unavailable window of a migration that just ended."""
    if _instruments is None or record.state not in ENDED:
        return
    strategy = {"strategy": record.chosen}
    _instruments.outcomes.add(1, {"outcome": record.state, **strategy})
    if (frozen := freeze_ms(record)) is not None:
        _instruments.freeze.record(frozen, strategy)
    if (window := unavailable_window_ms(record)) is not None:
        _instruments.unavailable.record(window, strategy)


def saga_decided(decision: Decision) -> None:
    """A transition was written: if it ended the saga, its outcome counts. `changed` is
    true only for the compare-and-set that wrote the end, so a redelivered command (whose
    outcome is stale, changed=False) never counts it again."""
    if decision.finished and decision.changed:
        migration_ended(decision.record)


def watch_commands(subscription: Any, host: str, role: str) -> None:
    """Report this consumer's pending commands on every export (read on the calling loop)."""
    if _instruments is not None:
        _instruments.queues[(host, role)] = _Queue(subscription, asyncio.get_running_loop())


def lease_expired(step: str) -> None:
    if _instruments is not None:
        _instruments.lease_expiries.add(1, {"step": step})


def frozen_orphans(host: str, count: int) -> None:
    if _instruments is not None:
        _instruments.frozen[host] = count


def mass_orphaning(host: str) -> None:
    if _instruments is not None:
        _instruments.mass_orphaning.add(1, {"host": host})
